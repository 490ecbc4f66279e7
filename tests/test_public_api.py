"""The public names of DESIGN §2 and their signatures: tests outside the repo call them."""

import inspect

import torch

import expface_kernels as ek

_KEYWORDS = {"s": 64.0, "m": None, "margin_grad": "exact", "reduction": "mean",
             "ignore_index": -1, "backend": "auto"}


def _params(fn):
    return inspect.signature(fn).parameters


def test_margin_softmax_loss_signature():
    p = _params(ek.margin_softmax_loss)
    assert list(p)[:4] == ["embeddings", "weight", "labels", "margin"]
    assert p["margin"].default == "expface"
    for name, default in _KEYWORDS.items():
        assert p[name].kind is inspect.Parameter.KEYWORD_ONLY and p[name].default == default, name


def test_expface_loss_signature():
    p = _params(ek.expface_loss)
    assert list(p)[:3] == ["embeddings", "weight", "labels"]
    assert p["s"].default == 64.0 and p["m"].default == 0.7
    assert p["s"].kind is p["m"].kind is inspect.Parameter.KEYWORD_ONLY
    assert any(q.kind is inspect.Parameter.VAR_KEYWORD for q in p.values())


def test_heads_signatures_and_defaults():
    for cls, m in ((ek.ExpFaceLoss, 0.7), (ek.ArcFaceLoss, 0.5), (ek.CosFaceLoss, 0.35),
                   (ek.SphereFaceLoss, 1.7)):
        assert issubclass(cls, ek.MarginSoftmaxLoss) and issubclass(cls, torch.nn.Module)
        p = _params(cls)
        assert list(p)[:4] == ["num_classes", "embedding_size", "s", "m"], cls
        assert p["s"].default == 64.0 and p["m"].default == m, cls
        head = cls(7, 3)
        assert head.weight.shape == (7, 3) and head.m == m and head.s == 64.0
        assert cls.__module__ == "expface_kernels.modules" and cls.__qualname__ == cls.__name__
    p = _params(ek.MarginSoftmaxLoss)
    assert list(p)[:3] == ["num_classes", "embedding_size", "margin"]
    for name, default in _KEYWORDS.items():
        assert p[name].default == default, name


def test_available_backends_names():
    got = ek.available_backends("cpu")
    assert set(got) == {"reference", "chunked", "triton", "extension"}
    assert got["reference"] is None and got["chunked"] is None
    assert all(v is None or (isinstance(v, str) and v) for v in got.values())


def test_exported_names():
    for name in ("margin_softmax_loss", "expface_loss", "available_backends", "ExpFaceLoss",
                 "ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss", "MarginSoftmaxLoss"):
        assert name in ek.__all__ and callable(getattr(ek, name)), name
