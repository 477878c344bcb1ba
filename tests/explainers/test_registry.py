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


def test_a_user_method_under_a_built_in_s_name_is_refused_at_register_and_the_registry_stays_whole():
    # the method modules load on the registry's first look-up: a fresh process, where register comes first
    import subprocess
    import sys
    code = ("from saliency_audit.explainers import Explainer, list_methods, register\n"
            "class Mine(Explainer):\n    name = 'grad'\n"
            "try:\n    register(Mine)\nexcept TypeError as e:\n    print('refused:', e)\n"
            "print('grad' in list_methods() and 'sal' in list_methods())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    refusal, complete = done.stdout.splitlines()
    assert refusal.startswith("refused: method 'grad' is already registered by") and complete == "True"


def test_the_package_s_subpackages_are_its_attributes_before_any_import_of_them():
    # the names load on first use (PEP 562): a subpackage must too, as it did when the package imported them all
    import subprocess
    import sys
    code = ("import saliency_audit.explainers as E\n"
            "print(E.cam.__name__, E.gradient.__name__, hasattr(E, 'no_such_thing'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.stdout.split() == ["saliency_audit.explainers.cam", "saliency_audit.explainers.gradient", "False"], \
        done.stderr[-2000:]
