"""The two towers: a torchvision ResNet for images, a Hugging Face encoder for text.

Both map into the text model's hidden width and are L2-normalised, so `img @ txt.T` is a cosine similarity in
[-1, 1]. The model returns features and the logit scale; the loss lives in loss.py.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, AutoTokenizer

# The statistics torchvision's ImageNet weights were trained with; images must be normalised with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# CLIP's cap on the learnable scale: beyond 100 (temperature 0.01) training becomes unstable.
MAX_LOGIT_SCALE = 100.0


class ModelError(ValueError):
    """A model the config names cannot be built here (unknown name, missing files, weights not downloadable)."""


def batchnorm_layers(module):
    """Every BatchNorm layer inside `module` (the image tower's; the text tower uses LayerNorm)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _resnet(name, pretrained):
    """A torchvision ResNet, with ImageNet weights through torchvision's own weight API when asked."""
    if not name.startswith(("resnet", "resnext", "wide_resnet")) or name not in torchvision.models.list_models():
        raise ModelError(f"image-model '{name}' is not a torchvision ResNet; use e.g. resnet18 or resnet50")
    if not pretrained:
        return torchvision.models.get_model(name, weights=None)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return torchvision.models.get_model(name, weights=weights)
    except Exception as e:  # no network, a proxy, a truncated download: all end here
        folder = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise ModelError(
            f"could not fetch ImageNet weights for {name} ({type(e).__name__}); download {weights.url} into "
            f"{folder}/ or set load-pretrained: false") from None


class ImageEncoder(nn.Module):
    """ResNet trunk (global-average-pooled) followed by a linear projection to `dim`."""

    def __init__(self, name, dim, pretrained):
        super().__init__()
        trunk = _resnet(name, pretrained)
        width = trunk.fc.in_features
        trunk.fc = nn.Identity()
        self.trunk = trunk
        self.proj = nn.Linear(width, dim)
        self.grad_checkpointing = False

    def _stages(self):
        t = self.trunk
        return [nn.Sequential(t.conv1, t.bn1, t.relu, t.maxpool), t.layer1, t.layer2, t.layer3, t.layer4]

    def forward(self, images):  # (B, 3, H, W)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            x = images
            for stage in self._stages():
                # use_reentrant=False works when the input needs no grad (frozen stem) and keeps RNG state.
                x = checkpoint(stage, x, use_reentrant=False)
            x = torch.flatten(self.trunk.avgpool(x), 1)
        else:
            x = self.trunk(images)  # (B, width)
        return self.proj(x)  # (B, dim)


def text_length_limit(config):
    """How many tokens the text model can take. RoBERTa-style models offset positions by padding_idx + 1."""
    limit = getattr(config, "max_position_embeddings", None) or 512
    if "roberta" in config.model_type or config.model_type in ("camembert", "longformer"):
        limit -= (config.pad_token_id or 0) + 1
    return limit


def missing_local_folder(name):
    """True when text-model `name` is meant as a local folder and is not there, so asking the hub for it would only
    wait through its retries and fail. A hub id is `name` or `owner/name`; anything else that does not exist is
    a missing folder: an absolute path or one starting with `.` or `~`, a backslash, more than one `/`, or a path
    under `pretrains/` (where pretrains/README.md puts text models) or under another folder that exists here."""
    if os.path.exists(name):
        return False
    first = name.split("/", 1)[0]
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or ("/" in name and (first == "pretrains" or os.path.isdir(first))))


def _check_text_model(name):
    if missing_local_folder(name):
        raise ModelError(f"text-model '{name}' is a local folder that does not exist; download a model into it "
                         f"(for the default: hf download roberta-base --local-dir pretrains/roberta, see "
                         f"pretrains/README.md) or name a hub id such as roberta-base")


def load_text_model(path, pretrained):
    """AutoModel from a local folder or hub id; random weights from its config when not pretrained."""
    _check_text_model(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"text-model '{path}' has no Hugging Face config ({str(e).splitlines()[0]}); "
                           f"see pretrains/README.md for how to download one") from None
    # The pooler (a dense layer on the first token) is left out: roberta-base ships no weights for it, and
    # unused parameters would also upset DistributedDataParallel. Encoders without the option keep theirs
    # unused, and it is dropped below.
    try:
        model = AutoModel.from_pretrained(path, add_pooling_layer=False) if pretrained else \
            AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        model = AutoModel.from_pretrained(path) if pretrained else AutoModel.from_config(config)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def load_tokenizer(path):
    _check_text_model(path)
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"text-model '{path}' has no tokenizer ({str(e).splitlines()[0]}); "
                           f"see pretrains/README.md") from None


TEXT_POOLINGS = ("first", "mean")


class TextEncoder(nn.Module):
    """A Hugging Face encoder. The feature is the first token's last hidden state (<s> / [CLS]) by default, or
    with `pooling="mean"` the average over the caption's real tokens (which carries every word from the first
    step: useful when the text tower starts from random weights)."""

    def __init__(self, model, pooling="first"):
        super().__init__()
        if pooling not in TEXT_POOLINGS:
            raise ModelError(f"text-pooling must be one of {', '.join(TEXT_POOLINGS)}, got '{pooling}'")
        self.model = model
        self.pooling = pooling
        self.dim = model.config.hidden_size

    def forward(self, input_ids, attention_mask):  # (B, T), (B, T)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, dim)
        if self.pooling == "first":
            return hidden[:, 0]  # (B, dim)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1): padding counts for nothing
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # (B, dim)


class RetrievalModel(nn.Module):
    def __init__(self, text_model, image_model="resnet50", pretrained=True, temperature=0.07,
                 learnable_temperature=False, text_pooling="first"):
        super().__init__()
        self.text = TextEncoder(text_model, text_pooling)
        self.image = ImageEncoder(image_model, self.text.dim, pretrained)
        init = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_scale", init)

    @property
    def dim(self):
        return self.text.dim

    def encode_image(self, images):  # (B, 3, H, W) -> (B, D)
        return F.normalize(self.image(images), dim=-1)

    def encode_text(self, input_ids, attention_mask):  # (B, T) -> (B, D)
        return F.normalize(self.text(input_ids, attention_mask), dim=-1)

    def logit_scale(self):
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def set_grad_checkpointing(self, enabled=True):
        self.image.grad_checkpointing = enabled
        text = self.text.model
        # transformers 5 renamed the switch; older releases only have the gradient_* names.
        on = getattr(text, "activation_checkpointing_enable", None) or text.gradient_checkpointing_enable
        off = getattr(text, "activation_checkpointing_disable", None) or text.gradient_checkpointing_disable
        on() if enabled else off()

    def freeze(self, image=False, text=False, batchnorm=False):
        """Fix a whole tower (weights and, for the image tower, BatchNorm statistics) or only BatchNorm."""
        self.frozen = {"image": image, "text": text, "batchnorm": batchnorm or image}
        for tower, flag in ((self.image, image), (self.text, text)):
            if flag:
                tower.requires_grad_(False)
        for m in self._batchnorms():
            if self.frozen["batchnorm"]:
                m.requires_grad_(False)
        return self.train(self.training)

    def _batchnorms(self):
        return batchnorm_layers(self.image)

    def train(self, mode=True):
        super().train(mode)
        frozen = getattr(self, "frozen", {})
        if frozen.get("batchnorm"):  # eval mode: use and keep the running statistics
            for m in self._batchnorms():
                m.eval()
        if frozen.get("text"):  # no dropout in a tower that does not learn
            self.text.eval()
        return self

    def forward(self, images, input_ids, attention_mask):
        return self.encode_image(images), self.encode_text(input_ids, attention_mask), self.logit_scale()


def build_model(cfg, pretrained=None):
    """Build the model described by a run's config (the same keys a checkpoint stores).

    `pretrained` overrides `load-pretrained`; eval.py passes False since the checkpoint holds every weight.
    """
    pretrained = cfg["load-pretrained"] if pretrained is None else pretrained
    text_model = load_text_model(cfg["text-model"], pretrained)
    return RetrievalModel(text_model, cfg["image-model"], pretrained, cfg["temperature"],
                          cfg["learnable-temperature"], cfg.get("text-pooling", "first"))
