"""Reference numbers for tests/test_models.py: trainable parameters and feature strides of smp's models.

Run once in the PyTorch venv of the Keras/PyTorch step comparison (torch 2.13.0+cpu,
segmentation-models-pytorch 0.6.0; see ../shared/bench/keras_vs_pytorch_step/setup_torchvenv.sh):

    $TMPDIR/torchvenv/bin/python benchmarks/smp_parameter_counts.py

Every model is smp's own default (``encoder_weights=None, in_channels=10, classes=1``), except that
the DeepLab models are built at output stride 16 and 8 to show the counts do not depend on it. The
numbers are written into tests/test_models.py by hand; the tests do not need PyTorch.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch


def _torchvision_ops_shim():
    """The PyPI torchvision wheel is linked against CUDA torch: define its nms schemas if its C ops do not load."""
    spec = importlib.util.find_spec("torchvision")
    libraries = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")) if spec and spec.origin else []
    try:
        if libraries:
            torch.ops.load_library(libraries[0])
            return None
    except OSError:
        pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return library


_SHIM = _torchvision_ops_shim()

import segmentation_models_pytorch as smp  # noqa: E402

MODELS = {"unet": smp.Unet, "unetpp": smp.UnetPlusPlus, "deeplabv3": smp.DeepLabV3, "deeplabv3plus": smp.DeepLabV3Plus}


def trainable(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def main() -> None:
    print(f"smp {smp.__version__}, torch {torch.__version__}; 10 bands, 1 class, encoder_weights=None")
    image = torch.zeros(1, 10, 256, 256)
    for encoder in ("resnet34", "resnet50"):
        for arch, builder in MODELS.items():
            strides = (None,) if arch.startswith("unet") else (16, 8)
            for output_stride in strides:
                options = {} if output_stride is None else {"encoder_output_stride": output_stride}
                model = builder(encoder_name=encoder, encoder_weights=None, in_channels=10, classes=1, **options).eval()
                with torch.no_grad():
                    features = model.encoder(image)
                feature_strides = [256 // feature.shape[-1] for feature in features[1:]]
                print(f"{encoder:9} {arch:14} OS {str(output_stride or 32):3} trainable {trainable(model):>10,d}  "
                      f"(encoder {trainable(model.encoder):>10,d}, decoder {trainable(model.decoder):>9,d}, "
                      f"head {trainable(model.segmentation_head):>5,d})  feature strides {feature_strides}")


if __name__ == "__main__":
    main()
