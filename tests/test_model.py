import pytest
import torch

from pipeline.errors import ModelContractError
from pipeline.model import XceptionLike, build_model, probabilities


@pytest.mark.parametrize("dims", [2, 3])
def test_output_is_one_logit_per_candidate(dims):
    model = XceptionLike(dims=dims, width=8, depth=2)
    crops = [torch.randn((3, 1) + (s,) * dims) for s in (16, 32, 48)]
    assert model(*crops).shape == (3,)


def test_branches_pool_to_128_features_and_head_is_384_64_1():
    model = XceptionLike()
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(384, 64), (64, 1)]
    assert not isinstance(list(model.head)[-1], (torch.nn.ReLU, torch.nn.Sigmoid))


def test_logits_can_be_negative_so_probabilities_span_both_sides_of_half():
    torch.manual_seed(0)
    model = XceptionLike(width=8, depth=2).eval()
    crops = [torch.randn(64, 1, s, s) * 3 for s in (16, 32, 48)]
    with torch.no_grad():
        # Nothing after the last Linear: shifting its bias moves logits across zero freely.
        model.head[-1].bias.sub_(model(*crops).median())
        logits = model(*crops)
    assert (logits < 0).any() and (logits > 0).any()
    probs = probabilities(logits)
    assert (probs < 0.5).any() and (probs > 0.5).any()
    assert torch.allclose(probs, torch.sigmoid(logits))


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    model = XceptionLike(width=4, depth=2).eval()
    crops = [torch.randn(4, 1, s, s) for s in (16, 32, 48)]
    with torch.no_grad():
        plain = model(*crops)
        model = model.to(memory_format=torch.channels_last)
        fast = model(*[c.contiguous(memory_format=torch.channels_last) for c in crops])
    assert torch.allclose(plain, fast, atol=1e-5)


def test_user_model_that_breaks_the_contract_is_refused():
    with pytest.raises(ModelContractError, match="cannot import"):
        build_model(dims=2, in_channels=1, scales=[16, 32, 48], target="no_such_pkg.mod:Net")
    with pytest.raises(ModelContractError, match="no callable"):
        build_model(dims=2, in_channels=1, scales=[16, 32, 48], target="torch.nn:NoSuchThing")
    with pytest.raises(ModelContractError, match=r"\[B\] or \[B, 1\]"):
        build_model(
            dims=2,
            in_channels=1,
            scales=[16, 32, 48],
            target="tests.contract_models:WrongShapeHead",
        )


def test_user_module_that_fails_on_import_is_a_contract_error(tmp_path, monkeypatch):
    # Not only ImportError: a user's module can raise anything while importing.
    (tmp_path / "broken_user_model.py").write_text("raise NameError('typo_in_module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelContractError, match="NameError: typo_in_module"):
        build_model(dims=2, in_channels=1, scales=[16, 32, 48], target="broken_user_model:Net")
