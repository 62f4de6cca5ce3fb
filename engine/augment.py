"""Colour jitter on a batch of uint8 images, on whatever device the batch is on.

The loader workers used to run torchvision's `ColorJitter` on every image; here the same augmentation runs once per
batch after the loader, so the workers only decode, crop and resize. The arithmetic is torchvision's tensor
`adjust_brightness`, `adjust_contrast` and `adjust_saturation` step for step (its grayscale weights, the clamp to
[0, 255] and the cut back to whole uint8 values after every step), and the random draws follow `ColorJitter`: per
sample, each factor uniform in [1 - s, 1 + s] and the three steps in a random order.
"""
import torch

# torchvision's rgb_to_grayscale weights for tensors (PIL's convert("L") uses 0.299, 0.587, 0.114)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# column of each step in `factors` and its id in `order`
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
# On the CPU, images go through the three steps a few at a time: float32 copies of about this many bytes stay in a
# core's cache (~1-2 MB of L2) through the ~20 passes over them. Single images would be cheaper still in one
# thread (-10% at 224 px), but with two torch threads on a busy machine their many small ops cost far more.
CPU_CHUNK_BYTES = 2 * 1024 * 1024


def jitter_params(batch_size, brightness, contrast, saturation, generator=None):
    """Random factors and step orders for `batch_size` images, drawn on the CPU (a few numbers per image).

    Returns factors (B, 3) float64, columns brightness, contrast, saturation, each uniform in
    [max(0, 1 - s), 1 + s] as `ColorJitter(s)` draws it; and order (B, 3) long, each row a uniformly random
    permutation of (BRIGHTNESS, CONTRAST, SATURATION), as `ColorJitter`'s `randperm` gives once hue is left out.
    A strength of 0 gives the factor 1, which leaves the image unchanged (ColorJitter skips the step).
    """
    strength = torch.tensor([brightness, contrast, saturation], dtype=torch.float64)  # (3,)
    low, high = (1 - strength).clamp(min=0), 1 + strength
    factors = low + (high - low) * torch.rand(batch_size, 3, dtype=torch.float64, generator=generator)  # (B, 3)
    order = torch.rand(batch_size, 3, generator=generator).argsort(dim=1)  # (B, 3): sorted noise, a random order
    return factors, order


def grayscale(x):
    """float (B, 3, H, W) holding whole numbers -> (B, 1, H, W), as torchvision's uint8 grayscale: weighted sum,
    then cut to a whole number. The multiplications and additions run one by one, in torchvision's order, so every
    float32 rounding is the same as there (a fused multiply-add would round differently)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    gray = r * GRAY_WEIGHTS[0]
    gray += g * GRAY_WEIGHTS[1]
    gray += b * GRAY_WEIGHTS[2]
    return gray.trunc_()


def apply_jitter(images, factors, order, chunk=None):
    """uint8 (B, 3, H, W) -> uint8 (B, 3, H, W), on the images' device, memory format kept.

    Each step blends the image with a per-sample target: black (brightness), the mean of its grayscale image
    (contrast) or its grayscale image (saturation): f * x + (1 - f) * target, clamped to [0, 255] and cut to a
    whole number. `factors` (B, 3) and `order` (B, 3) are those of `jitter_params`, on the CPU.

    `chunk` images go through all three steps at a time. The default is CPU_CHUNK_BYTES of float32 images on
    the CPU (3 at 224 px), and the whole batch on a GPU, where fewer, larger kernels are what counts.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise TypeError(f"apply_jitter expects uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    batch, device = images.shape[0], images.device
    if chunk is None:
        image_bytes = 4 * images[0].numel()  # one image as float32
        chunk = max(1, CPU_CHUNK_BYTES // image_bytes) if device.type == "cpu" else batch
    # Per-sample numbers in the order the steps run, (B, 3) each. float32 factors rounded from float64, and
    # 1 - f taken in float64 first: the numbers torchvision's Python floats become in its float32 arithmetic.
    # Exactly one target has a non-zero weight per step; adding the other's exact 0 changes no rounding.
    step_factor = factors.gather(1, order)  # (B, 3) float64
    keep = step_factor.to(torch.float32).to(device)
    mix = (1 - step_factor).to(torch.float32)
    gray_weight = torch.where(order == SATURATION, mix, 0).to(device)  # (B, 3)
    mean_weight = torch.where(order == CONTRAST, mix, 0).to(device)  # (B, 3)
    needs_gray = (order != BRIGHTNESS).tolist()  # on the host: no device sync to skip the grayscale image
    out = torch.empty_like(images)
    for start in range(0, batch, chunk):
        rows = slice(start, start + chunk)
        x = images[rows].float()  # (C, 3, H, W), whole numbers after every step, as torchvision's uint8 round trips
        n = x.shape[0]
        for step in range(3):
            f, on_gray, on_mean = (w[rows, step].view(n, 1, 1, 1) for w in (keep, gray_weight, mean_weight))
            if any(needs[step] for needs in needs_gray[rows]):
                gray = grayscale(x)  # (C, 1, H, W)
                mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # (C, 1, 1, 1)
                x.mul_(f).add_(gray.mul_(on_gray).add_(mean.mul_(on_mean)))  # f * x + (1 - f) * target
            else:  # brightness for every image here: the target is black
                x.mul_(f)
            x.clamp_(0, 255)
            if step < 2:  # the last cut is the uint8 copy below
                x.trunc_()
        out[rows] = x
    return out


def color_jitter(images, brightness=0.2, contrast=0.2, saturation=0.2, generator=None):
    """Random colour jitter of a uint8 (B, 3, H, W) batch, each image with its own factors and step order.

    The defaults are the ColorJitter of dataset.image_transform, which this replaces (a test keeps them equal).
    `generator` is a CPU torch.Generator; None draws from torch's global RNG, which training seeds per process and
    stores in its checkpoints.
    """
    factors, order = jitter_params(images.shape[0], brightness, contrast, saturation, generator)
    return apply_jitter(images, factors, order)
