"""Bad input raises a clear exception naming the argument (DESIGN §2)."""

import functools

import pytest
import torch

import expface_kernels as ek
from expface_kernels import backends
from expface_kernels.distributed import ShardedMarginSoftmaxLoss


def ok():
    return torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 3, 9, -1])


def call(x=None, w=None, y=None, **kw):
    x0, w0, y0 = ok()
    return ek.margin_softmax_loss(x0 if x is None else x, w0 if w is None else w,
                                  y0 if y is None else y, **kw)


@pytest.mark.parametrize("backend", ["reference", "chunked", "auto"])
@pytest.mark.parametrize("label", [10, 11, -2, 2**40])
def test_label_out_of_range(backend, label):
    y = torch.tensor([0, 3, label, -1])
    with pytest.raises(ValueError, match=r"labels\[2\] = .* outside \[0, 10\)"):
        call(y=y, backend=backend)


@pytest.mark.parametrize("backend", [n for n, why in ek.available_backends("cpu").items() if why is None])
def test_double_backward_raises(backend):
    """A gradient penalty (create_graph=True, then differentiate the gradient): a clear
    error on every backend, not a second derivative without this loss's terms (what the
    extension gave before) or an in-place error from inside autograd (chunked,
    reference). The first-order gradients under create_graph=True are the plain ones."""
    x, w, y = ok()
    x.requires_grad_()
    w.requires_grad_()
    gx0, gw0 = torch.autograd.grad(call(x, w, y, backend=backend), (x, w))
    assert gx0.abs().sum() > 0 and gw0.abs().sum() > 0
    gx, gw = torch.autograd.grad(call(x, w, y, backend=backend), (x, w), create_graph=True)
    assert torch.equal(gx, gx0) and torch.equal(gw, gw0)
    assert gx.requires_grad and gw.requires_grad
    for penalty in (gx.square().sum(), gw.sum(), gx.sum() + gw.sum()):
        with pytest.raises(RuntimeError, match=r"double backward is not supported"):
            penalty.backward(retain_graph=True)
    assert x.grad is None and w.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["reference", "chunked", "triton", "extension", "auto"])
@pytest.mark.parametrize("label", [10, -2, 2**40])
def test_cuda_label_out_of_range_after_the_queued_loss(backend, label):
    """On CUDA the labels are checked after the loss's kernels are queued (api.py): the
    same ValueError, no device-side assert, and the CUDA context still works after it."""
    if ek.available_backends("cuda")[backend if backend != "auto" else "chunked"] is not None:
        pytest.skip(f"{backend} is not available here")
    x0, w0, _ = ok()
    x, w = x0.cuda(), w0.cuda()
    y = torch.tensor([0, 3, label, -1], device="cuda")
    with pytest.raises(ValueError, match=r"labels\[2\] = .* outside \[0, 10\)"):
        ek.margin_softmax_loss(x, w, y, backend=backend)
    torch.cuda.synchronize()
    assert torch.isfinite(ek.margin_softmax_loss(x, w, torch.tensor([0, 3, 9, -1], device="cuda"),
                                                 backend=backend))


def test_label_equal_to_custom_ignore_index_is_fine():
    y = torch.tensor([0, 3, -100, 2])
    assert torch.isfinite(call(y=y, ignore_index=-100))
    with pytest.raises(ValueError, match="ignore_index=-100"):
        call(ignore_index=-100)  # the default labels hold a -1


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(x=torch.randn(4, 8).long()), TypeError, "embeddings must be float16"),
    (dict(w=torch.randint(0, 3, (10, 8))), TypeError, "weight must be float16"),
    (dict(x=torch.randn(4, 8, 2)), ValueError, r"embeddings must be 2-D \(B, D\)"),
    (dict(x=torch.randn(8)), ValueError, r"embeddings must be 2-D"),
    (dict(w=torch.randn(10)), ValueError, r"weight must be 2-D \(C, D\)"),
    (dict(w=torch.randn(10, 7)), ValueError, "weight must have D=8 columns"),
    (dict(w=torch.randn(0, 8)), ValueError, "weight must have at least one class"),
    (dict(x=torch.randn(0, 8), y=torch.zeros(0, dtype=torch.long)), ValueError, "at least one row"),
    (dict(y=torch.tensor([0, 1, 2])), ValueError, r"labels must have shape \(B,\)=\(4,\)"),
    (dict(y=torch.tensor([[0, 1, 2, 3]])), ValueError, r"labels must have shape"),
    (dict(y=torch.tensor([0.0, 1, 2, 3])), TypeError, "labels must be int64 or int32"),
    (dict(y=torch.tensor([0, 1, 2, 3], dtype=torch.int16)), TypeError, "labels must be int64 or int32"),
    (dict(y=[0, 1, 2, 3]), TypeError, "labels must be a torch.Tensor"),
    (dict(x=[[0.0] * 8] * 4), TypeError, "embeddings must be a torch.Tensor"),
    (dict(s=0.0), ValueError, "s must be a finite number > 0"),
    (dict(s=-64.0), ValueError, "s must be"),
    (dict(s=float("inf")), ValueError, "s must be"),
    (dict(s="64"), ValueError, "s must be"),
    (dict(margin="magface"), ValueError, "margin must be one of"),
    (dict(margin="expface", m=1.5), ValueError, "m for margin='expface' must satisfy 0 < m <= 1"),
    (dict(margin="combined", m=0.5), ValueError, "m for margin='combined'"),
    (dict(margin_grad="ste"), ValueError, "margin_grad must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(backend="cuda"), ValueError, "backend must be 'auto' or one of"),
])
def test_bad_arguments(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        call(**kw)


def test_numpy_scalars_are_numbers():
    """np.float32 / np.int64 (numbers.Real, not float / int subclasses) are taken as
    their Python values; a NaN or a bool among them is still refused."""
    np = pytest.importorskip("numpy")
    x, w, y = ok()
    loss = functools.partial(ek.margin_softmax_loss, x, w, y)
    want = loss(margin="combined", s=32.0, m=(1.0, 0.25, 0.1), ignore_index=-1)
    got = loss(margin="combined", s=np.float32(32.0), m=(np.float32(1.0), np.float32(0.25), np.float64(0.1)),
               ignore_index=np.int64(-1))
    assert torch.equal(got, want)
    assert torch.equal(loss(s=np.int32(64), m=np.float32(0.5)), loss(s=64.0, m=float(np.float32(0.5))))
    with pytest.raises(ValueError, match="s must be a finite number"):
        loss(s=np.float32("nan"))
    with pytest.raises(ValueError, match="s must be a finite number"):
        loss(s=torch.tensor(64.0))
    with pytest.raises(ValueError, match="m for margin='expface' must be a finite float"):
        loss(m=np.bool_(True))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        loss(ignore_index=np.float32(-1))


def test_device_mismatch_named():
    x, w, y = ok()
    meta_w = torch.empty(10, 8, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but embeddings are on cpu"):
        ek.margin_softmax_loss(x, meta_w, y)
    with pytest.raises(ValueError, match="labels are on meta"):
        ek.margin_softmax_loss(x, w, y.to("meta"))


def test_unavailable_backend_says_why(monkeypatch):
    """An explicit backend that cannot run raises with its reason; available_backends()
    reports a reason string for every backend that cannot run here."""
    monkeypatch.setitem(backends._loaded, "extension", "cannot import expface_kernels.extension: not built")
    with pytest.raises(RuntimeError, match="backend 'extension' .*not built"):
        call(backend="extension")
    report = ek.available_backends("cpu")
    assert set(report) == {"reference", "chunked", "triton", "extension"}
    assert report["reference"] is None and report["chunked"] is None
    assert report["extension"] == "cannot import expface_kernels.extension: not built"
    assert all(v is None or (isinstance(v, str) and v) for v in report.values())


def test_auto_lists_every_reason(monkeypatch):
    def never(x, w):
        return ["it never runs"]

    for name in ("extension", "chunked"):
        monkeypatch.setitem(backends._loaded, name, backends.Backend(name, None, None, never))
    with pytest.raises(RuntimeError, match="extension: it never runs; chunked: it never runs"):
        call(backend="auto")


def test_cuda_report_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    report = ek.available_backends("cuda")
    assert all(v == "no CUDA device is available" for v in report.values())


def test_module_arguments():
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        ek.ExpFaceLoss(0, 8)
    with pytest.raises(ValueError, match="embedding_size must be a positive int"):
        ek.ArcFaceLoss(10, -1)
    with pytest.raises(ValueError, match="m for margin='expface'"):
        ek.ExpFaceLoss(10, 8, m=2.0)


HEADS = [ek.MarginSoftmaxLoss, ek.ExpFaceLoss, ek.ArcFaceLoss, ek.CosFaceLoss, ek.SphereFaceLoss,
         ShardedMarginSoftmaxLoss]


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.__name__)
@pytest.mark.parametrize("kw, exc, msg", [
    (dict(num_classes=True), ValueError, "num_classes must be a positive int"),
    (dict(num_classes=2.0), ValueError, "num_classes must be a positive int"),
    (dict(embedding_size=0), ValueError, "embedding_size must be a positive int"),
    (dict(s=-1.0), ValueError, "s must be a finite number > 0"),
    (dict(s=float("nan")), ValueError, "s must be a finite number > 0"),
    (dict(margin_grad="ste"), ValueError, "margin_grad must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(ignore_index=-1.0), TypeError, "ignore_index must be an int"),
    (dict(backend="cuda"), ValueError, "backend must be 'auto' or one of"),
    (dict(dtype=torch.int64), TypeError, "dtype must be one of"),
])
def test_head_constructor_checks_every_keyword(head, kw, exc, msg):
    """Every head raises at construction, with the loss call's message, for each bad
    keyword (the single-device heads checked only the sizes and the margin before, so
    s=-1 or backend="cuda" surfaced at the first step)."""
    kw = dict(kw)  # the parametrised dict is shared by every head's case
    sizes = dict(num_classes=kw.pop("num_classes", 10), embedding_size=kw.pop("embedding_size", 8))
    with pytest.raises(exc, match=msg):
        head(sizes["num_classes"], sizes["embedding_size"], **kw)
