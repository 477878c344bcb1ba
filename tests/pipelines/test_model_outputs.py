"""Production heads the job takes logits [B,K>=2] from, and what it says of the others at preflight.

A single logit (a sigmoid head) used to run: every image "predicted" class 0 whatever the logit's
sign, its score and deletion/insertion AUCs all 1.0 (a softmax over one column). A tuple, dict or
Hugging Face ModelOutput ended in a traceback and exit 3; half or double parameters were blamed on
--channels/--resize; a forward that changed its input in place failed every gradient method and
silently rewrote the batch the other methods and the metrics read; a softmax inside the model drew
a warning and then flattened every score (the softmax of probabilities), where their logs are
logits. Now a single logit is read as two classes and probabilities as their logs; the other
heads are refused in one line and exit 2 that says what to change.
"""
from __future__ import annotations

import functools
import glob
import json

import pandas as pd
import pytest
import torch
from torch import nn

from saliency_audit.pipelines import audit
from saliency_audit.transforms.model.load import _own_input, read_as_two_classes

pytestmark = pytest.mark.slow  # a dozen end-to-end runs: out of the developer's loop, in CI


class Net(nn.Module):
    def __init__(self, outputs: int = 10):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(64, outputs)

    def forward(self, x):
        return self.head(self.features(x))


class Output(Net):
    """Returns what ``wrap`` makes of the logits."""

    def __init__(self, wrap):
        super().__init__()
        self.wrap = wrap

    def forward(self, x):
        return self.wrap(super().forward(x))


class Shifted(Net):
    """Centres its input first, in place (x.sub_) or not: the same function of the image."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place

    def forward(self, x):
        return super().forward(x.sub_(0.5) if self.in_place else x - 0.5)


def one_logit():
    return Net(1)


def flat_logit():  # [B], not [B,1]
    return Output(lambda z: z[:, 0])


def two_centred():  # the form the refusal of one_logit suggests
    return Output(lambda z: torch.cat([-z[:, :1], z[:, :1]], 1) / 2)


def sigmoid_head():  # the probability of the positive class, not its logit
    return Output(lambda z: torch.sigmoid(z[:, :1]))


class TwoOfOne(nn.Module):
    """one_logit's own network, its logit z answered as (-z/2, z/2) by the model itself."""

    def __init__(self):
        super().__init__()
        self.net = Net(1)

    def forward(self, x):
        z = self.net(x)
        return torch.cat([-z, z], 1) / 2


def pair():
    return Output(lambda z: (z, z.detach()))


def mapping():
    return Output(lambda z: {"logits": z})


def half():
    return Net().half()


def logits():
    return Net()


def probabilities():  # a softmax inside forward
    return Output(lambda z: torch.softmax(z, dim=1))


def shifted():
    return Shifted(in_place=False)


def shifted_in_place():
    return Shifted(in_place=True)


def run(model: str, demo_shard, tmp_path, capsys, *extra: str) -> tuple[int, list[str]]:
    code = audit.main(["--input", str(demo_shard), "--model", f"{__name__}:{model}", "--methods", "sal,occlusion",
                       "--channels", "1", "--device", "cpu", "--batch-size", "8", "--metric-steps", "4",
                       "--limit-per-shard", "8", "--output", str(tmp_path / "out"), *extra])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("saliency-audit")]


def saliency(folder) -> pd.DataFrame:
    """The saliency rows of run(..., folder, ...), in a fixed order."""
    rows = pd.read_parquet(glob.glob(str(folder / "out" / "saliency" / "*"))[0])
    return rows.sort_values(["method", "image_id", "target"]).reset_index(drop=True)


def twins(models, demo_shard, tmp_path, capsys, *extra: str) -> list[pd.DataFrame]:
    """Each model's rows from the same run (flags in ``extra`` override run's), each in its own folder."""
    tables = []
    for model in models:
        code, lines = run(model, demo_shard, tmp_path / model, capsys, *extra)
        assert code == 0, lines
        tables.append(saliency(tmp_path / model))
    return tables


@pytest.mark.parametrize("model, says", [
    ("flat_logit", "returned shape [1] (one value per image: for a sigmoid head's logit z, return z[:, None]"),
    ("pair", "the model must return one logits tensor [B,K], returned tuple"),
    ("mapping", "the model must return one logits tensor [B,K], returned dict"),
    ("half", "its parameters are torch.float16 and the job feeds float32 images"),
])
def test_a_head_the_job_cannot_read_is_refused_at_preflight_in_one_line(model, says, demo_shard, tmp_path, capsys):
    code, lines = run(model, demo_shard, tmp_path, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert says in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_sigmoid_head_s_single_logit_is_read_as_two_classes(demo_shard, tmp_path, capsys):
    """As its two-logit form (-z/2, z/2): the side the logit's sign says is predicted, scores sigmoid(z)."""
    read, given = twins(("one_logit", "TwoOfOne"), demo_shard, tmp_path, capsys, "--target", "predicted,1")
    assert len(read) == 8 * 2 * 2 and set(read["target"]) <= {0, 1}
    assert (read["predicted"] == given["predicted"]).all()
    for column in ("score", "deletion_auc", "insertion_auc"):
        assert (read[column] - given[column]).abs().max() < 1e-6, column
    for a, b in zip(read["saliency"], given["saliency"]):
        assert abs(a - b).max() < 1e-6
    chosen = read[read["target"] == read["predicted"]]
    assert len(chosen) >= 16 and (chosen["score"] >= 0.5).all()  # the side the logit's sign says
    manifest = json.loads((tmp_path / "one_logit" / "out" / "manifest.json").read_text())
    assert manifest["model"]["outputs"] == "binary_logit"


def test_a_torchscript_model_that_answers_probabilities_is_read_as_their_logs(demo_shard, tmp_path, capsys):
    """TorchScript takes no hooks: the reading wraps it."""
    path = tmp_path / "probabilities.pt"
    torch.jit.save(torch.jit.trace(probabilities().eval(), torch.rand(2, 1, 28, 28)), str(path))
    code = audit.main(["--input", str(demo_shard), "--model", str(path), "--methods", "sal,occlusion",
                       "--channels", "1", "--device", "cpu", "--batch-size", "8", "--metric-steps", "4",
                       "--limit-per-shard", "8", "--output", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err[-2000:]
    rows = saliency(tmp_path)
    assert rows["score"].std() > 1e-3  # not the flat softmax of probabilities
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]["outputs"] == "probabilities"


def test_the_two_logit_form_of_a_sigmoid_head_scores_by_the_logit(demo_shard, tmp_path, capsys):
    code, _ = run("two_centred", demo_shard, tmp_path, capsys, "--target", "top2")
    assert code == 0
    rows = saliency(tmp_path)
    assert len(rows) == 8 * 2 * 2  # 8 images, 2 methods, both classes
    by_class = rows.groupby(["image_id", "method"])["score"].sum()
    assert (by_class - 1).abs().max() < 1e-5  # sigmoid(z) and 1 - sigmoid(z)
    assert rows["deletion_auc"].std() > 1e-3 and rows["score"].std() > 1e-3


def test_a_model_that_changes_its_input_in_place_is_audited_as_its_out_of_place_twin(demo_shard, tmp_path, capsys):
    in_place, out_of_place = twins(("shifted_in_place", "shifted"), demo_shard, tmp_path, capsys)
    assert len(in_place) == 16
    for column in ("score", "deletion_auc", "insertion_auc"):
        assert (in_place[column] - out_of_place[column]).abs().max() < 1e-6, column
    for a, b in zip(in_place["saliency"], out_of_place["saliency"]):
        assert abs(a - b).max() < 1e-6


def test_a_model_that_answers_probabilities_is_read_as_their_logs(demo_shard, tmp_path, capsys):
    """Scores and metrics as from its logits (softmax(log p) = p); occlusion's log odds are the logits' too."""
    read, given = twins(("probabilities", "logits"), demo_shard, tmp_path, capsys)
    assert (read["score"] - given["score"]).abs().max() < 1e-5
    read, given = read[read["method"] == "occlusion"], given[given["method"] == "occlusion"]  # sal's: log p's
    for column in ("deletion_auc", "insertion_auc"):
        assert (read[column] - given[column]).abs().max() < 1e-5, column
    for a, b in zip(read["saliency"], given["saliency"]):
        assert abs(a - b).max() < 1e-5
    manifest = json.loads((tmp_path / "probabilities" / "out" / "manifest.json").read_text())
    assert manifest["model"]["outputs"] == "probabilities"


@functools.cache
def cached_one_logit():  # a factory that hands back the same module on every call
    return Net(1)


def test_a_cached_factory_s_sigmoid_head_is_read_once_however_often_it_loads(demo_shard, tmp_path, capsys):
    """The reading and the input copy are hooks on the module itself: a factory that returns the same
    module each time (preflight loads it twice, each in-process worker once more) read it as [B,4]."""
    code, lines = run("cached_one_logit", demo_shard, tmp_path, capsys)
    assert code == 0, lines
    rows = saliency(tmp_path)
    # read twice, (z/4, -z/4, -z/4, z/4): four classes, the predicted one's score under 0.5
    assert len(rows) == 16 and (rows["score"] >= 0.5).all()
    model = cached_one_logit()
    assert list(model._forward_hooks.values()).count(read_as_two_classes) == 1
    assert list(model._forward_pre_hooks.values()).count(_own_input) == 1
    assert tuple(model(torch.rand(3, 1, 28, 28)).shape) == (3, 2)


def test_the_reading_of_a_model_s_outputs_enters_the_method_fingerprints():
    """An audit history's maps of a sigmoid head made before the reading (class 0 always, scores 1.0)
    must not count as this run's: the same model and options, so only the reading tells them apart."""
    from saliency_audit.pipelines.config.options import parse_run_args
    from saliency_audit.pipelines.job.incremental import method_fingerprints
    options, _ = parse_run_args(["--input", "x.tar", "--model", "m.pt", "--methods", "sal", "--output", "o"])
    fingerprints = {reading: method_fingerprints(options, {"methods": {"sal": {"options": {}}},
                                                           "model_loading": {"outputs": reading}})["sal"]
                    for reading in ("logits", "binary_logit", "probabilities")}
    assert len(set(fingerprints.values())) == 3
    assert fingerprints["logits"] == method_fingerprints(options, {"methods": {"sal": {"options": {}}}})["sal"]


def test_the_traced_methods_read_a_sigmoid_head_as_the_other_methods_do(demo_shard, tmp_path, capsys):
    """deeplift and elrp explain the model's torch.fx graph, traced from its forward: the reading (a
    forward hook on the module) was lost, so class 1 failed every image (index 1 out of bounds) and
    class 0's maps explained z, not -z."""
    read, given = twins(("one_logit", "TwoOfOne"), demo_shard, tmp_path, capsys, "--methods", "deeplift,elrp",
                        "--limit-per-shard", "4", "--target", "predicted,1")
    for model in ("one_logit", "TwoOfOne"):
        errors = glob.glob(str(tmp_path / model / "out" / "errors" / "*"))
        assert not errors or pd.read_parquet(errors[0]).empty
    assert len(read) == len(given) >= 4 * 2 and set(read["target"]) == {0, 1}
    for a, b in zip(read["saliency"], given["saliency"]):
        assert abs(a - b).max() < 1e-6


def test_a_single_output_between_0_and_1_is_run_but_said_to_be_perhaps_a_probability(demo_shard, tmp_path, capsys):
    code = audit.main(["--input", str(demo_shard), "--model", f"{__name__}:sigmoid_head", "--methods", "sal",
                       "--channels", "1", "--limit-per-shard", "4", "--no-metrics", "--output", str(tmp_path / "out")])
    assert code == 0
    assert "if the head ends in a sigmoid, return the logit before it" in capsys.readouterr().err
