"""`make experiments` (train/experiments/): every job is a valid `casm-deploy` call, the
dependencies exist, and the runner skips what is done and orders the rest."""

import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from casm_deploy.cli import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train" / "experiments"))
import jobs as experiment_jobs  # noqa: E402
import run as experiment_run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import parts_check  # noqa: E402


def all_jobs(scale):
    return [job for module in experiment_run.EXPERIMENTS.values() for job in module.jobs(scale)]


@pytest.fixture
def dry_cli(monkeypatch):
    """`casm-deploy` with the work replaced by a record of the config each command built."""
    from casm_deploy.data import synth, tinyimagenet
    from casm_deploy.evaluation import benchmark as evaluate
    from casm_deploy.evaluation import visualize
    from casm_deploy.training import train

    configs = []
    patched = ((synth, "generate"), (tinyimagenet, "convert"), (train, "run"), (evaluate, "run"))
    for module, name in patched:
        monkeypatch.setattr(module, name, lambda cfg, *a, **k: configs.append(cfg))
    monkeypatch.setattr(visualize, "run", lambda cfg: configs.append(cfg) or {})  # files: none

    def invoke(args):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{args}:\n{result.output}"
        return configs[-1]

    return invoke


@pytest.mark.parametrize("scale", sorted(experiment_jobs.SCALES))
def test_every_job_is_a_valid_call_with_known_dependencies(scale, dry_cli, tmp_path, monkeypatch):
    scale = experiment_jobs.SCALES[scale]
    jobs = all_jobs(scale)
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))
    monkeypatch.chdir(tmp_path)  # the data folders exist when the evals run: make them
    datasets = {j.args[2] for j in jobs if j.args[:2] == ["data", "synth"]}
    datasets |= {j.args[3] for j in jobs if j.args[:2] == ["data", "tiny-imagenet"]}
    for folder in datasets:
        Path(folder).mkdir(parents=True)
    for job in jobs:
        assert set(job.deps) <= set(names), job.name
        if job.script == "train/experiments/object_sizes.py":  # DATA OUT NAME=CHECKPOINT...
            data, out, *named = job.args
            assert data in datasets and out.endswith(".json") and named, job.name
            assert all(n.partition("=")[2].endswith(".pt") for n in named), job.name
            continue
        if job.script:  # the other script the experiments call; its options must parse
            assert job.script == "benchmarks/parts_check.py", job.name
            assert parts_check.parse_args(job.args).classifier, job.name
            continue
        cfg = dry_cli(job.args)  # options parsed, and the command's config built and checked
        if job.args[0] == "eval":
            assert cfg.data in datasets and all(m.endswith(".pt") for m in cfg.models), job.name


def test_a_typo_in_a_job_fails_the_check(dry_cli):
    with pytest.raises(AssertionError, match="--epoch"):
        dry_cli(["train", "data/synth", "--epoch", "3"])


def test_runner_skips_finished_jobs_and_runs_the_rest_in_dependency_order(tmp_path, monkeypatch):
    scale = experiment_jobs.Scale("t", str(tmp_path / "runs"), str(tmp_path), 1, 1, 1, 1, 1.0)
    calls = []

    def fake_call(job, scale_, env):
        calls.append(job.name)
        job.done(scale_).parent.mkdir(parents=True, exist_ok=True)
        job.done(scale_).write_text('{"seconds": 0}')
        return 0.0

    monkeypatch.setattr(experiment_jobs, "_call", fake_call)
    make = experiment_jobs.Job
    jobs = [make("c", [], deps=["b"]), make("b", [], deps=["a"]), make("a", []), make("d", [])]
    jobs[2].done(scale).parent.mkdir(parents=True)
    jobs[2].done(scale).write_text('{"seconds": 0}')  # "a" finished in an earlier run
    experiment_jobs.run_jobs(jobs, scale, parallel=1)
    assert "a" not in calls and sorted(calls) == ["b", "c", "d"]
    assert calls.index("b") < calls.index("c")


def test_an_interrupted_training_job_is_resumed(tmp_path):
    job = experiment_jobs.train_job("t", "data", str(tmp_path), "run", "--epochs", "1")
    assert "--resume" not in job.command()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    assert job.command()[-1] == "--resume"


def test_a_selection_brings_the_jobs_it_needs():
    make = experiment_jobs.Job
    every = [make("a", []), make("b", [], deps=["a"]), make("c", [], deps=["b"]), make("d", [])]
    chosen = experiment_run.with_dependencies([every[2]], every)
    assert [j.name for j in chosen] == ["a", "b", "c"]


def test_mean_range_gives_the_mean_and_the_extremes():
    assert experiment_jobs.mean_range([0.1, 0.4, 0.25]) == "0.250 (0.100-0.400)"
    assert experiment_jobs.mean_range([0.5, None]) == "0.500"
    assert experiment_jobs.mean_range([]) == "-"


OLD_RESULTS = """# Experiments: results

Written by hand. Machine: Old CPU, 2 cores. Each job ran on one thread.

## 1. First

first text

3 jobs; 7 minutes of one CPU thread in all.

## 2. Second

old second text

2 jobs; 5 minutes of one CPU thread in all.
"""


def test_rewriting_one_section_keeps_the_others_and_their_machine(tmp_path, monkeypatch):
    scale = experiment_jobs.Scale("t", str(tmp_path / "runs"), str(tmp_path), 1, 1, 1, 1, 1.0)
    job = experiment_jobs.Job("second-job", ["eval", "x"])
    job.done(scale).parent.mkdir(parents=True)
    job.done(scale).write_text('{"seconds": 120}')
    second = types.SimpleNamespace(
        __doc__="Second.\n\nnew second text", jobs=lambda s: [job], report=lambda s: "| table |"
    )
    first = types.SimpleNamespace(__doc__="First.\n\nunused", jobs=lambda s: [], report=None)
    monkeypatch.setattr(experiment_run, "EXPERIMENTS", {"1. First": first, "2. Second": second})
    path = tmp_path / "RESULTS.md"
    path.write_text(OLD_RESULTS)
    experiment_run.write_results(path, scale, {2})
    text = path.read_text()
    assert "first text" in text and "old second text" not in text
    assert "3 jobs; 7 minutes of one CPU thread in all, on Old CPU, 2 cores." in text
    assert f"1 jobs; 2 minutes of one CPU thread in all, on {experiment_run.machine()}." in text
    assert "| table |" in text and "casm-deploy eval x" in text
    assert "In all 4 jobs, 9 minutes" in text
    # Written again, the kept section keeps its machine and the header its sums.
    experiment_run.write_results(path, scale, {2})
    assert path.read_text() == text
    path.write_text("# Experiments: results\n")  # a section never run is named, not made up
    experiment_run.write_results(path, scale, {2})
    text = path.read_text()
    assert "## 1. First" not in text and "Not run yet, so not here: section 1 " in text
    assert "## 2. Second" in text and "In all 1 jobs, 2 minutes" in text


def test_object_sizes_scores_each_model_and_the_centre_box_by_object_size(
    tiny_data, make_checkpoint, tmp_path
):
    """Section 8's LE by true box area: the bins hold every image, and the centre box's LE
    over them is the one `eval` reports for it."""
    import json

    import object_sizes

    model = make_checkpoint(tmp_path / "m.pt", tiny_data, image_size=32)
    out = tmp_path / "sizes.json"
    object_sizes.main(str(tiny_data), str(out), [f"m={model}"])
    sizes = json.loads(out.read_text())
    assert set(sizes) == {"center", "m"}
    for result in sizes.values():
        assert sum(b["n"] for b in result["bins"]) == 12  # tiny_data's validation images
        weighted = sum(b["n"] * b["LE"] for b in result["bins"] if b["n"]) / 12
        assert weighted == pytest.approx(result["LE"])
    scores = tmp_path / "eval.json"
    args = ["eval", model, str(tiny_data), "--baseline", "center", "--json", str(scores)]
    assert CliRunner().invoke(app, args).exit_code == 0
    centre = json.loads((tmp_path / "eval.center.json").read_text())
    assert sizes["center"]["LE"] == pytest.approx(centre["LE"])
