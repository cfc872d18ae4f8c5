"""PyTorch side of the p3 benchmark: a CPU training step of segmentation-models-pytorch (smp) models.

A copy of ../shared/bench/keras_vs_pytorch_step/smp_step.py (read-only there) that also prints the
CPU time of this process per step, as benchmarks/train_step.py does for Keras: on a shared machine
the wall time grows with other processes' load, the CPU time hardly (compare_keras_pytorch.sh).

Run:  $TMPDIR/torchvenv/bin/python smp_step.py [--size 256] [--batch 8] [--warmup 1] [--steps 3]
          [--encoder resnet34] [--arch unet unetpp deeplabv3 deeplabv3plus] [--loss focal|bce]
          [--variant matched|stock] [--threads 2]

Measures what rts-tf's benchmarks/train_step.py measures for Keras: random N(0,1) images of
(batch, size, size, 10) and labels (random > 0.9, 0/1 uint8), seed 0; a fixed normalisation
(mean 0, std 1, as the project's Normalization layer); the model in training mode; one step =
zero_grad + forward + loss + backward + AdamW(lr 1e-3, weight_decay 0.004, eps 1e-7: Keras'
AdamW defaults) step + loss.item() (Keras' train_on_batch returns the loss as a number). The loss
is the project's focal loss (gamma 2, alpha 0.25, probabilities clipped to [1e-6, 1-1e-6], per-tile
mean over pixels whose label is not 255, then mean over the batch), or its binary cross-entropy.
W warm-up steps, then N timed steps: one line per step and one summary line per architecture in
the project's format, with the median instead of the mean.

--variant matched (default) makes each smp model the project's graph as closely as smp allows:
  unet           smp.Unet, decoder_channels (256,128,64,32,16), bilinear upsampling.
  unetpp         smp.UnetPlusPlus as above, and its nested nodes rebuilt (smp's DecoderBlock) so
                 every node of a level has that level's decoder width, as in rts-tf (stock smp
                 gives the inner nodes the encoder's width: 64 instead of 32 at 1/2, 128 at 1/8).
  deeplabv3      smp.DeepLabV3 with an output-stride-32 encoder (smp only offers 8 or 16, so the
                 encoder is replaced after construction), ASPP rates (3,6,9), dropout 0.1, 3x3 head,
                 upsampling x32.
  deeplabv3plus  smp.DeepLabV3Plus with an output-stride-32 encoder, full (not separable) ASPP
                 convolutions with rates (3,6,9) and dropout 0.1, no extra separable conv after ASPP,
                 ASPP upsampled x8 to 1/4, 48-channel low-level skip, two full 3x3 conv-BN-ReLU (256),
                 3x3 head, upsampling x4.
--variant stock: smp's own defaults (only encoder_weights=None, in_channels=10, classes=1).
Nothing is downloaded: encoder_weights is always None.

torchvision shim: the PyPI torchvision wheel is linked against CUDA torch (libc10_cuda.so); with
the CPU torch wheel its C ops (_C.so) do not load, and `import torchvision` (pulled in by timm and
smp) then fails with "operator torchvision::nms does not exist". When _C.so cannot be loaded, the
schemas of torchvision::nms and torchvision::qnms are defined here before torchvision is imported;
no model in this script uses those ops.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch


def _torchvision_ops_shim():
    """Define torchvision's nms/qnms schemas when torchvision's C ops cannot be loaded; return the Library."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    libraries = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
    if libraries:
        try:
            torch.ops.load_library(libraries[0])
            return None
        except OSError:
            pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    print("note: torchvision C ops not loadable with this torch; defined torchvision::nms/qnms schemas (shim)",
          file=sys.stderr)
    return library


_TORCHVISION_SHIM = _torchvision_ops_shim()  # kept alive: the schemas live as long as this Library object

import segmentation_models_pytorch as smp  # noqa: E402
from segmentation_models_pytorch.base import initialization as smp_init  # noqa: E402
from segmentation_models_pytorch.base.heads import SegmentationHead  # noqa: E402
from segmentation_models_pytorch.decoders.deeplabv3.decoder import ASPP  # noqa: E402
from segmentation_models_pytorch.decoders.unetplusplus.decoder import DecoderBlock  # noqa: E402
from torch import nn  # noqa: E402

ARCHES = ("unet", "unetpp", "deeplabv3", "deeplabv3plus")
DECODER_FILTERS = (256, 128, 64, 32, 16)  # rts-tf's unet/unetpp default, 1/16 .. full resolution
DEEPLAB_FILTERS = 256  # rts-tf's deeplab default decoder_filters
ASPP_RATES_P5 = (3, 6, 9)  # rts-tf's default: ASPP on P5 (1/32)
ASPP_DROPOUT = 0.1
LOW_LEVEL_FILTERS = 48
IGNORE = 255
EPSILON = 1e-6


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU()]


def rebuild_unetpp_nodes(decoder) -> None:
    """Give every nested node of level L the decoder width of L (rts-tf), instead of the encoder's (smp)."""
    in_ch, skip, out = decoder.in_channels, decoder.skip_channels, decoder.out_channels
    blocks = {}
    for level in range(len(in_ch) - 1):
        for depth in range(level + 1):
            if depth == 0:  # main path: x_0_L = block(x_0_{L-1}, [x_1..x_L at L, encoder skip])
                block_in, block_skip = in_ch[level], skip[level] + level * out[level]
            elif depth == level:  # first column: block(encoder feature, encoder skip)
                block_in, block_skip = skip[level - 1], skip[level]
            else:  # inner node: block(x_d_{L-1}, [x_{d+1}..x_L at L, encoder skip])
                block_in, block_skip = out[level - 1], (level - depth) * out[level] + skip[level]
            blocks[f"x_{depth}_{level}"] = DecoderBlock(block_in, block_skip, out[level], use_norm="batchnorm",
                                                        interpolation_mode="bilinear")
    blocks[f"x_0_{len(in_ch) - 1}"] = DecoderBlock(in_ch[-1], 0, out[-1], use_norm="batchnorm",
                                                   interpolation_mode="bilinear")
    decoder.blocks = nn.ModuleDict(blocks)


def build(arch: str, encoder: str, variant: str) -> nn.Module:
    common = dict(encoder_name=encoder, encoder_weights=None, in_channels=10, classes=1)
    if variant == "stock":
        return {"unet": smp.Unet, "unetpp": smp.UnetPlusPlus, "deeplabv3": smp.DeepLabV3,
                "deeplabv3plus": smp.DeepLabV3Plus}[arch](**common)
    if arch == "unet":
        return smp.Unet(decoder_channels=DECODER_FILTERS, decoder_interpolation="bilinear", **common)
    if arch == "unetpp":
        model = smp.UnetPlusPlus(decoder_channels=DECODER_FILTERS, decoder_interpolation="bilinear", **common)
        rebuild_unetpp_nodes(model.decoder)
        model.initialize()
        return model
    stride32 = smp.encoders.get_encoder(encoder, in_channels=10, depth=5, weights=None, output_stride=32)
    if arch == "deeplabv3":
        model = smp.DeepLabV3(encoder_output_stride=16, decoder_channels=DEEPLAB_FILTERS,
                              decoder_atrous_rates=ASPP_RATES_P5, decoder_aspp_dropout=ASPP_DROPOUT, **common)
        model.encoder = stride32
        model.segmentation_head = SegmentationHead(DEEPLAB_FILTERS, 1, kernel_size=3, upsampling=32)
        model.initialize()
        return model
    if arch == "deeplabv3plus":
        model = smp.DeepLabV3Plus(encoder_output_stride=16, decoder_channels=DEEPLAB_FILTERS,
                                  decoder_atrous_rates=ASPP_RATES_P5, decoder_aspp_separable=False,
                                  decoder_aspp_dropout=ASPP_DROPOUT, **common)
        model.encoder = stride32
        decoder = model.decoder
        decoder.aspp = ASPP(stride32.out_channels[-1], DEEPLAB_FILTERS, ASPP_RATES_P5, separable=False,
                            dropout=ASPP_DROPOUT)
        decoder.up = nn.Upsample(mode="bilinear", scale_factor=8, align_corners=True)
        decoder.block1 = nn.Sequential(*conv_bn_relu(stride32.out_channels[2], LOW_LEVEL_FILTERS, 1))
        decoder.block2 = nn.Sequential(*conv_bn_relu(DEEPLAB_FILTERS + LOW_LEVEL_FILTERS, DEEPLAB_FILTERS),
                                       *conv_bn_relu(DEEPLAB_FILTERS, DEEPLAB_FILTERS))
        model.segmentation_head = SegmentationHead(DEEPLAB_FILTERS, 1, kernel_size=3, upsampling=4)
        model.initialize()
        return model
    raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHES)}")


class Segmenter(nn.Module):
    """Fixed normalisation (as rts-tf's Normalization layer) + network + sigmoid probability."""

    def __init__(self, network: nn.Module, bands: int = 10):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.zeros(1, bands, 1, 1))
        self.register_buffer("std", torch.ones(1, bands, 1, 1))

    def forward(self, x):
        return torch.sigmoid(self.network((x - self.mean) / self.std))


def _prepare(y_true, y_pred):
    batch = y_true.shape[0]
    y_true = y_true.float().reshape(batch, -1)
    weight = (y_true != IGNORE).float()
    target = (y_true == 1).float()
    probability = y_pred.float().reshape(batch, -1).clamp(EPSILON, 1 - EPSILON)
    return target, weight, probability


def _masked_mean(values, weight):
    return (values * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def focal(y_true, y_pred, gamma: float = 2.0, alpha: float = 0.25):
    target, weight, p = _prepare(y_true, y_pred)
    p_true = target * p + (1 - target) * (1 - p)
    alpha_true = target * alpha + (1 - target) * (1 - alpha)
    return _masked_mean(-alpha_true * (1 - p_true).pow(gamma) * torch.log(p_true), weight).mean()


def binary_crossentropy(y_true, y_pred):
    target, weight, p = _prepare(y_true, y_pred)
    return _masked_mean(-(target * torch.log(p) + (1 - target) * torch.log(1 - p)), weight).mean()


LOSSES = {"focal": focal, "bce": binary_crossentropy}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def count_weights(model: nn.Module) -> int:
    """Parameters + BatchNorm statistics, as Keras' count_params counts (num_batches_tracked left out)."""
    buffers = sum(b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var")))
    return sum(p.numel() for p in model.parameters()) + buffers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--arch", nargs="*", default=list(ARCHES), choices=ARCHES)
    parser.add_argument("--loss", default="focal", choices=sorted(LOSSES))
    parser.add_argument("--variant", default="matched", choices=("matched", "stock"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, args.size, args.size, 10)).astype(np.float32)
    labels = (rng.random((args.batch, args.size, args.size, 1)) > 0.9).astype(np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(np.ascontiguousarray(labels.transpose(0, 3, 1, 2)))
    loss_fn = LOSSES[args.loss]
    print(f"training step on CPU: {args.encoder}, {args.size} px x 10 bands, batch {args.batch} "
          f"[pytorch {torch.__version__}, smp {smp.__version__}, {torch.get_num_threads()} threads, "
          f"{args.variant}, {args.loss}, {args.warmup} warm-up + {args.steps} timed steps]", flush=True)
    for arch in args.arch:
        model = Segmenter(build(arch, args.encoder, args.variant)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.004, eps=1e-7)

        def step() -> float:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(y, model(x))
            loss.backward()
            optimizer.step()
            return loss.item()

        for _ in range(args.warmup):
            step()
        times = []
        for index in range(1, args.steps + 1):
            started, cpu_started = time.perf_counter(), cpu_seconds()
            loss = step()
            times.append(time.perf_counter() - started)
            print(f"    {arch} step {index}/{args.steps} {times[-1]:7.3f} s  cpu {cpu_seconds() - cpu_started:6.3f} s  "
                  f"loss {loss:.4f}", flush=True)
        seconds = statistics.median(times)
        print(f"  {arch:<14} {seconds:6.2f} s/step  {args.batch / seconds:6.2f} images/s  "
              f"({count_weights(model) / 1e6:.1f} M parameters)  median of {args.steps}", flush=True)
        del model, optimizer


if __name__ == "__main__":
    main()
