import pytest
import torch

from saliency_audit.explainers import Explainer, get_explainer, list_methods, method_parameters


def test_foundation_methods_are_registered():
    assert {"sal", "grad", "intg", "deeplift"} <= set(list_methods())
    assert list_methods() == sorted(list_methods())


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'nope'.*known methods: .*intg"):
        get_explainer("nope", torch.nn.Linear(2, 2))


def test_unknown_option_is_refused_with_the_accepted_ones():
    with pytest.raises(ValueError, match=r"does not take option\(s\) steps; it takes: n_steps"):
        get_explainer("intg", torch.nn.Linear(2, 2), steps=3)


def test_every_method_declares_a_usable_interface():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(2 * 8 * 8, 3)).eval()
    for name in list_methods():
        params = method_parameters(name)
        if any(p is __import__("inspect").Parameter.empty for p in params.values()):
            continue  # methods with required options (e.g. abele's --aae) are tested on their own
        explainer = get_explainer(name, model)
        assert isinstance(explainer, Explainer) and explainer.name == name
        assert set(explainer.passes()) <= {"forward", "backward"}
        assert set(explainer.options()) == set(params)
        # a method that says it needs only the model's answers (so ONNX models may use it) runs no backward pass
        assert explainer.needs_gradients or not explainer.passes().get("backward"), name
