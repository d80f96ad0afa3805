"""kernels/resample.py: the Triton kernel (Triton's interpreter on CPU) against the torch reference."""
import pytest
import torch

import crop
import kernels
from kernels import resample
from kernels.resample import crop_resample_ref, crop_resample_triton, pil_weights


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, h // 8 + 2, w // 8 + 2, generator=g), size=(h, w),
                                             mode="bilinear")[0]
    sharp = (torch.rand(3, h, w, generator=g) > 0.5).float()  # pixel-level noise: hard edges everywhere
    mix = torch.where(torch.arange(w)[None, None, :] < w // 2, smooth, sharp)
    return (mix * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def _sizes(boxes, budget):
    return [crop.smart_resize(int(y2 - y1), int(x2 - x1), max_pixels=budget) for x1, y1, x2, y2 in boxes]


@pytest.mark.parametrize("h,w,boxes,budget", [
    # several boxes per launch: every border touched, odd sizes, down- and upscaling
    (67, 91, [(0, 0, 91, 67), (0, 30, 30, 67), (60, 0, 91, 25)], 4 * 784),
    # a box under 28 px (upscaled), and an elongated one
    (61, 203, [(5, 7, 22, 20), (0, 20, 203, 41), (0, 58, 203, 61)], 4 * 784),  # the last is about 68:1
    # strong downscale: many taps per output pixel
    (300, 90, [(0, 0, 90, 300)], 4 * 784),
])
def test_kernel_matches_reference(h, w, boxes, budget):
    img = _image(h, w)
    b = torch.tensor(boxes, dtype=torch.float32)
    sizes = _sizes(boxes, budget)
    ours = crop_resample_triton(img, b, sizes)
    ref = crop_resample_ref(img, b, sizes)
    assert ours.shape == ref.shape == (sum(oh * ow // 196 for oh, ow in sizes), 1176)
    assert (ours - ref).abs().max() <= 1e-4


def test_kernel_bf16_output():
    img = _image(64, 80, seed=3)
    b = torch.tensor([(3, 5, 61, 60)], dtype=torch.float32)
    sizes = _sizes(b.tolist(), 4 * 784)
    ours = crop_resample_triton(img, b, sizes, out_dtype=torch.bfloat16)
    ref = crop_resample_ref(img, b, sizes)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - ref).abs().max() <= 2 ** -5  # two bf16 ulps at |x| < 4 (the interpreter may truncate)


def test_dispatch_uses_the_kernel(monkeypatch):
    img = _image(40, 50, seed=4)
    b = torch.tensor([(0, 0, 50, 40)], dtype=torch.float32)
    calls = []
    monkeypatch.setattr(resample, "crop_resample_triton", lambda *a: calls.append(1) or crop_resample_ref(*a))
    assert kernels.crop_resample(img, b, [(28, 56)], torch.bfloat16).dtype == torch.bfloat16
    monkeypatch.setenv("KERNELS", "triton")
    kernels.crop_resample(img, b, [(28, 56)])
    monkeypatch.setenv("KERNELS", "auto")  # CPU tensors: the torch path
    kernels.crop_resample(img, b, [(28, 56)])
    assert calls == [1]


@pytest.mark.parametrize("n_in,n_out", [(10, 28), (28, 28), (100, 28), (97, 56), (5, 56)])
def test_pil_weights_rows_sum_to_one_inside_the_input(n_in, n_out):
    lo, w = pil_weights(n_in, n_out)
    torch.testing.assert_close(w.sum(1), torch.ones(n_out))
    last = lo + (w != 0).long().cumsum(1).argmax(1)  # index of the last non-zero tap
    assert lo.min() >= 0 and last.max() < n_in


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu(dtype):
    img = _image(900, 1300, seed=5)
    boxes = [(0, 0, 1300, 900), (10, 20, 300, 200), (1200, 800, 1300, 900), (500, 0, 520, 900)]
    b = torch.tensor(boxes, dtype=torch.float32)
    sizes = _sizes(boxes, 256 * 784)
    ref = crop_resample_ref(img, b, sizes)
    ours = crop_resample_triton(img.cuda(), b.cuda(), sizes, out_dtype=dtype).float().cpu()
    assert (ours - ref).abs().max() <= (1e-4 if dtype == torch.float32 else 2 ** -6)
