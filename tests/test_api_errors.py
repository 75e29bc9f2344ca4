"""Bad input: a ValueError that says what was wrong and what is allowed; the CLI exits non-zero, no traceback."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import pytest
import torch
from tiny_models import TinySpec, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

import executor
from executor.adapter import ModelAdapter


@pytest.fixture(scope="module")
def model():
    return tiny_model(TinySpec(num_layers=4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="eesd", exit_layer=0), r"exit_layer must be an integer in \[1, 3\]"),
        (dict(method="eesd", exit_layer=4), r"exit_layer must be an integer in \[1, 3\]"),
        (dict(method="eesd", exit_layer=-2), r"exit_layer must be an integer in \[1, 3\]"),
        (dict(method="eesd", exit_layer=2, draft_len=0), r"draft_len must be an integer in \[1, 256\]"),
        (dict(method="eesd", exit_layer=2, draft_len=10**6), r"in \[1, 256\] \(the model's context"),
        (dict(method="eesd", exit_layer=2, policy="heuristic:max=100000"), r"max draft length .* \[1, 256\]"),
        (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0"),
        (dict(method="beam"), r"method must be one of ar, eesd"),
        (dict(max_new_tokens=300), r"exceeds the model's context of 256 positions"),
        (dict(method="eesd", exit_layer=2, policy="fixed:x"), r"policy 'fixed:x'"),
    ],
)
def test_bad_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        executor.generate(model, [1, 2, 3], **kwargs)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "empty prompt"),
        (torch.zeros(2, 3, 1, dtype=torch.long), r"must be \[seq\] or \[batch, seq\]"),
        (torch.tensor([[1, 2], [3, 4]]), None),
        ([1, 2, 500], r"input_ids must lie in \[0, 96\]"),
        (torch.ones(1, 3), "integer token ids"),
        (list(range(1, 90)) * 3, "exceeds the model's context"),
    ],
)
def test_bad_prompts(model, prompt, message):
    if message is None:  # a well-formed batch, for contrast
        assert executor.generate(model, prompt, max_new_tokens=2).sequences.shape == (2, 4)
        return
    with pytest.raises(ValueError, match=message):
        executor.generate(model, prompt, max_new_tokens=4)


def test_a_prompt_filling_the_context_with_no_length_set_says_so(model) -> None:
    """No length set anywhere: the drop-in takes what the context leaves, and a prompt that fills it (256 positions
    here) is refused for that, not for a max_new_tokens nobody set."""
    generator = executor.EarlyExitGenerator(model, exit_layer=2)
    with pytest.raises(ValueError, match=r"256 tokens wide and fills the model's context \(256 positions"):
        generator.generate(torch.ones(1, 256, dtype=torch.long))
    assert generator.generate(torch.ones(1, 254, dtype=torch.long)).shape == (1, 256)  # what the context leaves


def test_zero_new_tokens_returns_the_prompt(model):
    result = executor.generate(model, [5, 6], method="eesd", exit_layer=1, max_new_tokens=0)
    assert result.sequences.tolist() == [[5, 6]]


def test_unsupported_architecture_names_the_class():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported model class GPT2LMHeadModel"):
        ModelAdapter(gpt2)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"])
@pytest.mark.parametrize("tied", [False, True])
def test_adapter_reuses_the_model_weights(arch, tied):
    model = tiny_model(TinySpec(arch=arch, tied=tied))
    adapter = ModelAdapter(model)
    assert adapter.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert (adapter.lm_head.weight.data_ptr() == adapter.embed_tokens.weight.data_ptr()) == tied
    assert all(a is b for a, b in zip(adapter.layers, model.model.layers, strict=True))
    assert adapter.norm is model.model.norm


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model(TinySpec(num_layers=4), torch.float32).save_pretrained(path)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "executor.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def cli_status(*args: str) -> int:
    """`eesd ARGS` in this process: its exit status (argparse refusals exit), torch threads left as they were."""
    from executor.cli import main

    threads = torch.get_num_threads()
    try:
        return main(list(args))
    except SystemExit as done:
        return done.code
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--exit-layer", "9"], r"exit_layer must be an integer in \[1, 3\]"),
        (["--draft-len", "0"], "draft_len must be an integer in [1, 256]"),
        (["--method", "eesd", "--draft-len", "1000000"], "in [1, 256] (the model's context)"),
        (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1, got -3"),
        (["--repetition-penalty", "nan"], "repetition_penalty must be a finite number > 0, got nan"),
        (["--do-sample", "--temperature", "inf"], "temperature must be a finite number > 0 when sampling, got inf"),
        (["--seed", str(2**70)], "seed must be an integer in [0, 4294967295]"),
        (
            ["--method", "ppsd", "--backend", "distributed", "--stall-timeout", "0"],
            "stall_timeout_s must be a finite number of seconds > 0",
        ),
        (["--dtype", "int8"], "--dtype must be one of"),
        (["--method", "ppsd", "--sync-every", "0"], "sync_every must be an integer in 1..64"),
    ],
)
def test_cli_reports_user_errors_without_traceback(saved_model, args, message, capsys):
    """In this process (a CLI process costs seconds of imports; `test_cli_generates_and_matches_ar` runs one): an
    exception the CLI let through would fail the test here as a traceback would there."""
    assert cli_status("generate", "--model", str(saved_model), "--prompt-ids", "1,2,3", *args) == 2
    stderr = capsys.readouterr().err
    assert message.replace("\\", "") in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "0.5"], "--temperature 0.5 is for sampling: add --do-sample"),
        (["--sampling", "rejection"], "--sampling rejection is for sampling: add --do-sample"),
        (["--top-p", "0.9"], "--top-p 0.9 is for sampling: add --do-sample"),
        (["--stages", "3"], "--stages is for --method ppsd, got --method eesd"),
        (["--backend", "distributed"], "--backend is for --method ppsd, got --method eesd"),
        (["--method", "ar", "--policy", "fixed:3"], "--policy is for --method eesd, got --method ar"),
        (["--method", "ar", "--head", "shared:100"], "--head is for --method eesd or ppsd, got --method ar"),
        (["--head", "heads/none.safetensors"], "--head heads/none.safetensors: no such file"),
        (["--head", "heads"], "--head heads: a directory (expected a .safetensors head file"),
        (["--method", "ppsd", "--draft-len", "2"], "--draft-len is for --method eesd, got --method ppsd"),
        (["--do-sample", "--sampling", "rejection", "--compare-ar"], "--compare-ar checks that the output is AR's"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--warmup", "-1"], "--warmup must be >= 0 (untimed calls before the timed one), got -1"),
        (["--method", "beam"], "--method must be one of ar, eesd, ppsd, got 'beam'"),
        (["--chat"], "--chat wraps --prompt's text"),
        (["--method", "ppsd", "--backend", "bogus"], "--backend must be one of sequential, streams, distributed"),
        (["--method", "ppsd", "--stages", "0"], "--stages must make at least 2 stages (a pipeline of stages), got 0"),
        (["--method", "ppsd", "--stage-boundaries", "0,4"], "--stage-boundaries 0,4 (cut points) must make at least 2"),
        (["--stages", "2"], "--stages is for --method ppsd, got --method eesd"),  # the default's value, given
        (["--method", "ppsd", "--stage-boundaries", ",10"], "--stage-boundaries must be comma-separated layer numbers"),
        (["--method", "ppsd", "--stage-boundaries", ""], "--stage-boundaries must be comma-separated layer numbers"),
        (["--method", "ppsd", "--stall-timeout", "5"], "--stall-timeout is for --backend distributed"),
        (["--method", "ppsd", "--backend", "distributed", "--stop", "x"], "--stop is not supported with --backend"),
        (["--policy", "fixed:2", "--draft-len", "3"], "--draft-len 3 and --policy fixed:2: the policy sets the draft"),
    ],
)
def test_cli_refuses_flags_the_run_would_ignore_before_loading(tmp_path, args, message, capsys):
    """A flag the method does not use, a sampling flag without --do-sample, a check that cannot hold: one line naming
    the flag, before the model loads (the model named does not exist)."""
    assert cli_status("generate", "--model", str(tmp_path / "absent"), "--prompt-ids", "1,2,3", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("eesd generate: error: ") and message in err and len(err.splitlines()) == 1, err


def test_cli_refuses_round_costs_of_another_model(tmp_path, capsys):
    """A round-costs file measured with another model (its metadata.model) is refused before the model loads."""
    import json

    path = tmp_path / "rounds.json"
    metadata = {"model": "gemma3-270m", "exit_layer": 7}
    document = {"format": "eesd.round_costs", "schema_version": 1, "costs": [1, 1.4], "metadata": metadata}
    path.write_text(json.dumps(document), encoding="utf-8")
    assert cli_status("generate", "--model", "smollm2-135m", "--prompt-ids", "1,2", "--round-costs", str(path)) == 2
    err = capsys.readouterr().err
    assert f"--round-costs {path}: metadata.model: measured with gemma3-270m (Gemma-3-270M), not --model" in err


def test_cli_names_a_failed_stage_process_in_one_line(saved_model, monkeypatch, capsys):
    """A distributed run whose stage process died: one line naming it, exit status 1, no traceback."""
    from executor import api
    from executor.cli import main
    from executor.ppsd_dist import PPSDWorkerError

    def dies(*args, **kwargs):
        assert kwargs["stall_timeout_s"] == 7.5
        raise PPSDWorkerError("PPSD stage 2 (rank 1) died: killed by signal 9 (SIGKILL)", "Traceback ...\nlong")

    monkeypatch.setattr(api, "generate", dies)
    argv = ["generate", "--model", str(saved_model), "--prompt-ids", "1,2", "--method", "ppsd"]
    assert main([*argv, "--backend", "distributed", "--stall-timeout", "7.5"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "eesd generate: error: PPSD stage 2 (rank 1) died: killed by signal 9 (SIGKILL)"
    assert not any("Traceback" in line for line in err)


def test_cli_missing_model_is_a_clear_error(tmp_path, capsys):
    assert cli_status("generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1") == 2
    stderr = capsys.readouterr().err
    assert "nope" in stderr and "Traceback" not in stderr


def test_cli_generates_and_matches_ar(saved_model):
    done = run_cli(
        "generate", "--model", str(saved_model), "--prompt-ids", "4,5,6", "--method", "eesd",
        "--exit-layer", "2", "--draft-len", "3", "--max-new-tokens", "12", "--compare-ar",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "identical to AR: True" in done.stdout
    assert "exit layer 2 (shared); method eesd: 12 new tokens" in done.stdout  # where the drafts exit, and with what


def test_cli_warmup_times_the_last_of_its_calls_and_a_cold_captured_call_says_so(saved_model, monkeypatch, capsys):
    import executor.api

    calls, real = [], executor.api.generate

    def counted(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(kwargs["method"])
        result.stats.capture = "compile"  # as a captured run reports it (capturing on a CPU takes minutes)
        return result

    monkeypatch.setattr(executor.api, "generate", counted)
    argv = ["generate", "--model", str(saved_model), "--prompt-ids", "4,5,6", "--method", "eesd", "--exit-layer", "2",
            "--max-new-tokens", "5", "--compare-ar", "--no-progress"]  # fmt: skip
    assert cli_status(*argv, "--warmup", "2") == 0
    assert calls == ["eesd"] * 3 + ["ar"] * 3
    assert "a first call" not in capsys.readouterr().out
    assert cli_status(*argv) == 0
    assert "(a first call: its time includes capturing its passes (compile); --warmup 1" in capsys.readouterr().out


def test_cli_ppsd_reads_the_device_every_few_ticks(saved_model, capsys):
    status = cli_status(
        "generate", "--model", str(saved_model), "--prompt-ids", "4,5,6", "--method", "ppsd", "--stages", "2",
        "--max-new-tokens", "12", "--sync-every", "4", "--compare-ar",
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "identical to AR: True" in out and "exit layer 2" in out  # the end of stage 1 of 4 layers
    reads = int(re.search(r"(\d+) host reads", out).group(1))
    ticks = int(re.search(r"(\d+) ticks", out).group(1))
    assert -(-ticks // 4) <= reads < ticks, out  # blocks of at most 4 ticks, cut to the tokens left


def test_generate_wires_ppsd(model):
    ar = executor.generate(model, [1, 2, 3], max_new_tokens=12)
    ppsd = executor.generate(model, [1, 2, 3], method="ppsd", stages=2, max_new_tokens=12)
    assert ppsd.sequences.tolist() == ar.sequences.tolist()
    assert ppsd.stats.ticks >= 12 and ppsd.stats.new_tokens == 12


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(stages=1), "stages"),
        (dict(stages=9), "must not exceed"),
        (dict(stage_boundaries=[3, 1]), "boundar"),
        (dict(stages=2, stage_boundaries=[1], exit_layer=3), "stage 1"),
        (dict(head="not-a-head"), "head must be 'shared', 'shared:N', a .safetensors head file"),
        (dict(do_sample=True, sampling="rejection"), "rejection"),
    ],
)
def test_ppsd_bad_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        executor.generate(model, [1, 2, 3], method="ppsd", max_new_tokens=4, **kwargs)


def test_a_subcommand_imports_only_its_own_module() -> None:
    """`eesd calibrate` must run where simpy is missing (the GPU image): building its parser imports no simulator
    engine; `eesd simulate` does."""
    import subprocess
    import sys

    code = (
        "import sys; from executor.cli import build_parser; build_parser({!r}); "
        "print('simpy' in sys.modules, 'sim.engine' in sys.modules)"
    )
    run = lambda command: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code.format(command)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert run("calibrate") == ["False", "False"]
    assert run("simulate") == ["True", "True"]


def test_a_model_saved_without_a_tokenizer_says_so(saved_model, capsys):
    """A folder of config and weights only: transformers would build an empty tokenizer from the config, which turned
    a text prompt into <unk> and printed nothing. `--prompt` is refused with what to give; `--prompt-ids` decodes and
    prints the new token ids."""
    from executor.models import load_tokenizer

    with pytest.raises(ValueError, match="has no tokenizer .* give token ids"):
        load_tokenizer(saved_model)
    assert cli_status("generate", "--model", str(saved_model), "--prompt", "hello", "--max-new-tokens", "3") == 2
    err = capsys.readouterr().err
    assert err.startswith("eesd generate: error: ") and "has no tokenizer" in err and "--prompt-ids" in err
    assert cli_status("generate", "--model", str(saved_model), "--prompt-ids", "1,2", "--max-new-tokens", "3") == 0
    printed = capsys.readouterr().out
    ids = [line for line in printed.splitlines() if line.startswith("[")]
    assert len(ids) == 1 and len(ids[0].strip("[]").split(",")) == 3, printed


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("embedding_multiplier", 12.0, "scaled embeddings (embedding_multiplier 12.0)"),
        ("residual_multiplier", 0.22, "scaled residual connections"),
        ("logits_scaling", 8.0, "scaled logits"),
        ("clip_qkv", 8.0, "clipped query, key and value projections"),
        ("use_parallel_residual", True, "parallel attention and MLP residuals"),
        ("no_rope_layers", [1, 0, 1, 1], "layers without rotary embeddings (no_rope_layers)"),
    ],
)
def test_settings_the_adapter_does_not_compute_are_refused(field, value, message):
    """A class added to SUPPORTED_ARCHITECTURES (docs/executor.md) whose config asks for what happens outside the
    modules the adapter calls is refused by name, not decoded into other tokens; neutral values pass."""
    from executor.adapter import ModelAdapter

    model = tiny_model(TinySpec(num_layers=4), torch.float32)
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=f"unsupported LlamaForCausalLM: {re.escape(message)}"):
        ModelAdapter(model)
    setattr(model.config, field, [1, 1, 1, 1] if isinstance(value, list) else 1.0 if isinstance(value, float) else 0)
    if field != "clip_qkv":
        ModelAdapter(model)


def test_a_class_not_run_names_where_adding_one_is_told():
    with pytest.raises(ValueError, match=r"unsupported model class GPT2LMHeadModel: .*\(docs/executor.md, Supported"):
        from executor.adapter import check_architecture

        check_architecture("GPT2LMHeadModel")


def test_every_command_takes_a_dtype_by_either_name():
    """`bf16` and `bfloat16` alike, in the executor's commands (torch's names) and the calibration commands (the
    short ones), where each refused the other family's spelling."""
    import argparse

    from calibrate.cli import add_arguments as calibrate_arguments
    from executor.generate_cli import add_arguments as generate_arguments

    generate = argparse.ArgumentParser()
    generate_arguments(generate)
    args = generate.parse_args(["--model", "m", "--prompt-ids", "1", "--dtype", "bf16", "--draft-dtype", "fp16"])
    assert (args.dtype, args.draft_dtype) == ("bfloat16", "float16")
    calibrate = argparse.ArgumentParser()
    calibrate_arguments(calibrate)
    args = calibrate.parse_args(["latency", "--model", "m", "--out", "o", "--dtype", "float32"])
    assert args.dtype == "fp32"


def test_cli_stage_count_given_and_cut_points_must_agree(saved_model, capsys):
    """Every bound (0,1,2,4: a leading 0) makes as many stages as the cut points 1,2 do; a --stages given that the cut
    points contradict is refused, as a --stages other than the default's value was."""
    common = ("generate", "--model", str(saved_model), "--prompt-ids", "1,2,3", "--method", "ppsd", "--threads", "1",
              "--max-new-tokens", "3", "--no-progress")  # fmt: skip
    for bounds in ("1,2", "0,1,2,4"):
        assert cli_status(*common, "--stage-boundaries", bounds) == 0
        assert "3 stages [0,1) [1,2) [2,4)" in capsys.readouterr().out
    assert cli_status(*common, "--stage-boundaries", "1,2", "--stages", "2") == 2
    assert "stage_boundaries must hold the 1 cut points between 2 stages" in capsys.readouterr().err


def test_cli_stage_boundaries_set_the_stage_count(tmp_path, capsys):
    """Cut points 5,20 make three stages: what is refused next is the missing model, not the stage count."""
    assert cli_status("generate", "--model", str(tmp_path / "absent"), "--prompt-ids", "1,2,3", "--method", "ppsd",
                      "--stage-boundaries", "5,20") == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "stage_boundaries must" not in err and "no such model file or directory" in err, err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "ar", "exit_layer": 2}, "method 'ar' ignores exit_layer=2 (for eesd or ppsd)"),
        ({"method": "ar", "head": "shared:32"}, "method 'ar' ignores head='shared:32' (for eesd or ppsd)"),
        ({"method": "ar", "policy": "beta-ts", "draft_len": 2}, "ignores policy='beta-ts' (for eesd), draft_len=2"),
        ({"method": "ppsd", "policy": "fixed:2"}, "method 'ppsd' ignores policy='fixed:2' (for eesd)"),
        ({"method": "eesd", "exit_layer": 2, "backend": "streams"}, "'eesd' ignores backend='streams' (for ppsd)"),
        ({"method": "eesd", "exit_layer": 2, "stage_boundaries": [2]}, "ignores stage_boundaries=[2] (for ppsd)"),
    ],
)
def test_a_setting_the_method_ignores_is_named_in_a_warning_once(model, kwargs, message) -> None:
    """As HF warns of a sampling setting in a greedy call: a loop over methods with one set of settings runs, and
    what a method ignores is said. The drop-in says it once, when built, and decodes as the method alone would."""
    method = kwargs["method"]
    alone = executor.generate(model, [1, 2, 3], method=method, max_new_tokens=4, **({"exit_layer": 2} if method ==
                              "eesd" else {}))  # fmt: skip
    with pytest.warns(UserWarning, match=re.escape(message)):
        got = executor.generate(model, [1, 2, 3], max_new_tokens=4, **kwargs)
    assert got.sequences.tolist() == alone.sequences.tolist()
    with pytest.warns(UserWarning, match=re.escape(message)):
        generator = executor.EarlyExitGenerator(model, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = generator.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.tolist() == alone.sequences.tolist()


def test_the_default_head_and_draft_length_pass_with_any_method_without_a_warning(model) -> None:
    ar = executor.generate(model, [1, 2, 3], max_new_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("ar", "ppsd"):
            out = executor.generate(model, [1, 2, 3], method=method, max_new_tokens=4, head="shared", draft_len=4)
            assert out.sequences.tolist() == ar.sequences.tolist()
