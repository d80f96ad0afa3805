"""kernels/resample.py: the Triton kernel (Triton's interpreter on CPU) against the torch reference."""
import pytest
import torch

import crop
import kernels
from conftest import KERNEL_DEVICE
from kernels import resample
from kernels.resample import crop_resample_ref, crop_resample_triton


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, h // 8 + 2, w // 8 + 2, generator=g), size=(h, w),
                                             mode="bilinear")[0]
    sharp = (torch.rand(3, h, w, generator=g) > 0.5).float()  # pixel-level noise: hard edges everywhere
    mix = torch.where(torch.arange(w)[None, None, :] < w // 2, smooth, sharp)
    return (mix * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def _sizes(boxes, budget):
    return [crop.smart_resize(int(y2 - y1), int(x2 - x1), max_pixels=budget) for x1, y1, x2, y2 in boxes]


@pytest.mark.parametrize("hpass", list(resample.HPASSES))
@pytest.mark.parametrize("h,w,boxes,budget", [
    # several boxes per launch: every border touched, odd sizes, down- and upscaling; 5 boxes: each program
    # finds its own among 8 lookup slots, 3 of them empty
    (67, 91, [(0, 0, 91, 67), (0, 30, 30, 67), (60, 0, 91, 25), (33, 41, 52, 50), (70, 10, 90, 60)], 4 * 784),
    # a box under 28 px (upscaled), and an elongated one
    (61, 203, [(5, 7, 22, 20), (0, 20, 203, 41), (0, 58, 203, 61)], 4 * 784),  # the last is about 68:1
    # strong downscale: many taps per output pixel
    (300, 90, [(0, 0, 90, 300)], 4 * 784),
])
def test_kernel_matches_reference(h, w, boxes, budget, hpass):
    img = _image(h, w)
    b = torch.tensor(boxes, dtype=torch.float32)
    sizes = _sizes(boxes, budget)
    ours = crop_resample_triton(img.to(KERNEL_DEVICE), b, sizes, hpass=hpass).cpu()
    ref = crop_resample_ref(img, b, sizes)
    assert ours.shape == ref.shape == (sum(oh * ow // 196 for oh, ow in sizes), 1176)
    assert (ours - ref).abs().max() <= _bound(img, b, sizes)


def _bound(img, b, sizes):
    """1e-4 in the interpreter; on a GPU, at most twice torch's own CPU-vs-GPU difference on the same input
    (the reference's GPU run differs from its CPU run by ~1.6e-4: different resampling arithmetic)."""
    if KERNEL_DEVICE == "cpu":
        return 1e-4
    torch_gpu = crop_resample_ref(img.cuda(), b.cuda(), sizes).cpu()
    return max(1e-4, 2 * float((torch_gpu - crop_resample_ref(img, b, sizes)).abs().max()))


def test_reference_resizes_on_the_cpu_what_cuda_refuses(monkeypatch):
    """torch's CUDA antialiased resize raises past a ~90x downscale (its weights outgrow shared memory): the
    reference redoes that one resize on the CPU; any other error is raised."""
    img = _image(50, 60, seed=5)
    b = torch.tensor([(0, 0, 60, 50)], dtype=torch.float32)
    expected = crop_resample_ref(img, b, [(28, 28)])
    interpolate, calls = resample.F.interpolate, []

    def refusing(x, **kw):  # CUDA's refusal, once: the horizontal pass
        calls.append(kw["size"])
        if len(calls) == 1:
            raise RuntimeError("Provided interpolation parameters can not be handled with current algorithm "
                               "implementation. Please reduce the scale factor. Too much shared memory required")
        return interpolate(x, **kw)

    monkeypatch.setattr(resample.F, "interpolate", refusing)
    with pytest.raises(RuntimeError, match="shared memory"):  # a CPU tensor: nothing to fall back to
        crop_resample_ref(img, b, [(28, 28)])
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # a pretend CUDA tensor
    calls.clear()
    assert torch.equal(crop_resample_ref(img, b, [(28, 28)]), expected)
    assert calls == [(50, 28), (50, 28), (28, 28)]  # the refused pass redone, then the next


def test_the_host_sends_a_record_per_box_whatever_the_crops_size():
    """Taps and weights are computed in the kernels: the host's plan is a few integers per box, the same for a
    40-pixel crop as for a whole 8K image, so it costs microseconds and one small copy."""
    small, *sizes_small = resample.plan(torch.tensor([(0, 0, 40, 30)]), [(28, 28)], "gather")
    big, *sizes_big = resample.plan(torch.tensor([(0, 0, 7680, 4320)]), [(756, 1344)], "gather")
    assert small.shape == big.shape == (1, resample.FIELDS.value)
    assert sizes_small == [2, 4, 3 * 30 * 28]  # h-pass programs (16 x 64 tiles), patches, intermediate floats
    assert sizes_big == [270 * 21, 54 * 96, 3 * 4320 * 1344]
    assert resample.plan(torch.tensor([(0, 0, 7680, 4320)]), [(756, 1344)], "dot")[1] == 68 * 21  # 64 x 64 tiles
    assert big[0, resample.KX.value] == resample.num_taps(7680, 1344) == 2 * 12 + 1  # scale 5.7: support 11.4


def test_kernel_bf16_output():
    img = _image(64, 80, seed=3)
    b = torch.tensor([(3, 5, 61, 60)], dtype=torch.float32)
    sizes = _sizes(b.tolist(), 4 * 784)
    ours = crop_resample_triton(img.to(KERNEL_DEVICE), b, sizes, out_dtype=torch.bfloat16).cpu()
    ref = crop_resample_ref(img, b, sizes)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - ref).abs().max() <= 2 ** -5  # two bf16 ulps at |x| < 4 (the interpreter may truncate)


def test_dispatch_uses_the_kernel(monkeypatch):
    img = _image(40, 50, seed=4)
    b = torch.tensor([(0, 0, 50, 40)], dtype=torch.float32)
    calls = []

    def triton(*args, hpass):
        calls.append(hpass)
        return crop_resample_ref(*args)

    monkeypatch.setattr(resample, "crop_resample_triton", triton)
    assert kernels.crop_resample(img, b, [(28, 56)], torch.bfloat16).dtype == torch.bfloat16
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors take the kernel only interpreted (on a GPU machine too)
    monkeypatch.setenv("KERNELS", "triton")
    kernels.crop_resample(img, b, [(28, 56)])
    monkeypatch.setenv("KERNELS", "auto")  # CPU tensors: the torch path
    kernels.crop_resample(img, b, [(28, 56)])
    assert calls == [None]  # no card, no measurement: resample.HPASS


def test_on_a_card_auto_takes_the_kernel_with_the_h_pass_bench_measured_faster(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNEL_CHOICE", str(tmp_path / "choice.json"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    kernels.record_winner("resample", "triton", dict(reference=0.004, triton_dot=0.002, triton_gather=0.001),
                          hpass="gather")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # a pretend CUDA tensor
    calls = []
    monkeypatch.setattr(resample, "crop_resample_triton", lambda *args, hpass: calls.append(hpass))
    kernels.crop_resample(_image(40, 50), torch.tensor([(0, 0, 50, 40)]), [(28, 56)])
    kernels.record_winner("resample", "triton", {}, hpass="an h-pass since removed")
    kernels.crop_resample(_image(40, 50), torch.tensor([(0, 0, 50, 40)]), [(28, 56)])
    assert calls == ["gather", None]  # None: resample.HPASS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# each h-pass in fp32; the bf16 output (written by the v-pass) with the default one
@pytest.mark.parametrize("dtype,hpass", [(torch.float32, h) for h in resample.HPASSES]
                         + [(torch.bfloat16, resample.HPASS)])
@pytest.mark.parametrize("h,w,boxes", [
    (900, 1300, [(0, 0, 1300, 900), (10, 20, 300, 200), (1200, 800, 1300, 900), (500, 0, 520, 900)]),
    # bench.py's crops of an 8K original at 1,024 tokens: up to ~30 taps per axis, an intermediate of 60 MB
    (4320, 7680, [(0, 0, 7680, 4320), (100, 200, 2100, 1400), (3000, 1000, 3900, 1500), (5000, 3000, 5400, 3300),
                  (10, 10, 200, 120), (6000, 100, 7680, 4320), (2500, 2500, 2560, 2540), (1000, 1000, 4000, 4000)]),
])
def test_kernel_on_gpu(dtype, h, w, boxes, hpass):
    img = _image(h, w, seed=5)
    b = torch.tensor(boxes, dtype=torch.float32)
    sizes = _sizes(boxes, 1024 * 784)
    key = (h, w, tuple(boxes))
    if key not in _GPU_REFS:  # the 8K reference takes seconds on a CPU: once for the three cases
        _GPU_REFS[key] = crop_resample_ref(img, b, sizes), _bound(img, b, sizes)
    ref, bound = _GPU_REFS[key]
    ours = crop_resample_triton(img.cuda(), b.cuda(), sizes, out_dtype=dtype, hpass=hpass).float().cpu()
    # bf16 output: one rounding of values |x| < 4 (2^-7) on top of the fp32 bound
    assert (ours - ref).abs().max() <= bound + (0 if dtype == torch.float32 else 2 ** -6)


_GPU_REFS = {}  # (h, w, boxes) -> the reference on the CPU and the bound
