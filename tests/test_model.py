import pytest
import torch
import torchvision

import model as model_module
from model import ModelError, build_model, load_text_model, text_length_limit


def tiny_cfg(tiny_data, **kw):
    cfg = {"text-model": str(tiny_data / "text"), "image-model": "resnet18", "load-pretrained": False,
           "temperature": 0.07, "learnable-temperature": False}
    cfg.update(kw)
    return cfg


def test_features_are_unit_vectors_and_forward_returns_no_loss(tiny_data):
    m = build_model(tiny_cfg(tiny_data)).eval()
    img, txt, scale = m(torch.randn(3, 3, 32, 32), torch.tensor([[0, 5, 6, 2]] * 3), torch.ones(3, 4, dtype=torch.long))
    assert img.shape == txt.shape == (3, m.dim) and m.dim == 32
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert m.text.model.pooler is None  # no random pooler on the text path


def test_text_feature_is_the_first_token_hidden_state(tiny_data):
    m = build_model(tiny_cfg(tiny_data)).eval()
    ids, mask = torch.tensor([[0, 7, 8, 2]]), torch.ones(1, 4, dtype=torch.long)
    hidden = m.text.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    assert torch.allclose(m.encode_text(ids, mask), torch.nn.functional.normalize(hidden, dim=-1), atol=1e-6)


def test_learnable_temperature_is_a_parameter_and_clamped(tiny_data):
    m = build_model(tiny_cfg(tiny_data, **{"learnable-temperature": True, "temperature": 0.001}))
    assert any(n == "log_scale" for n, _ in m.named_parameters())
    assert m.logit_scale().item() == 100.0
    fixed = build_model(tiny_cfg(tiny_data))
    assert not any(n == "log_scale" for n, _ in fixed.named_parameters())


def test_freeze_options(tiny_data):
    m = build_model(tiny_cfg(tiny_data)).freeze(image=False, text=True, batchnorm=True).train()
    assert not any(p.requires_grad for p in m.text.parameters())
    assert all(p.requires_grad for n, p in m.image.named_parameters() if "bn" not in n and "downsample.1" not in n)
    assert not m.image.trunk.bn1.training and not m.image.trunk.bn1.weight.requires_grad
    assert m.image.trunk.conv1.training and not m.text.training


def test_unknown_image_model_and_missing_text_model_are_clear(tiny_data, tmp_path):
    with pytest.raises(ModelError, match="image-model 'vit_b_16' is not a torchvision ResNet"):
        build_model(tiny_cfg(tiny_data, **{"image-model": "vit_b_16"}))
    (tmp_path / "nothing").mkdir()  # a folder without a model (a missing one: tests/test_input_checks.py)
    with pytest.raises(ModelError, match="text-model '.*nothing' has no Hugging Face config.*pretrains/README.md"):
        load_text_model(str(tmp_path / "nothing"), pretrained=True)


def test_unreachable_imagenet_weights_say_where_to_put_the_file(tiny_data, monkeypatch):
    def offline(name, weights=None):
        if weights is not None:
            raise OSError("network is unreachable")
        return torchvision.models.resnet18()

    monkeypatch.setattr(model_module.torchvision.models, "get_model", offline)
    with pytest.raises(ModelError, match=r"could not fetch ImageNet weights for resnet50 .*download "
                                         r"https://download.pytorch.org/models/resnet50-.*\.pth into .*checkpoints/ "
                                         r"or set load-pretrained: false"):
        model_module._resnet("resnet50", pretrained=True)


def test_roberta_length_limit_leaves_room_for_position_offset(tiny_data):
    m = build_model(tiny_cfg(tiny_data))
    assert text_length_limit(m.text.model.config) == m.text.model.config.max_position_embeddings - 2


def test_mean_pooling_averages_real_tokens_only(tiny_data):
    m = build_model(tiny_cfg(tiny_data, **{"text-pooling": "mean"})).eval()
    ids = torch.tensor([[0, 7, 8, 2, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    hidden = m.text.model(input_ids=ids, attention_mask=mask).last_hidden_state[0, :4].mean(dim=0)
    assert torch.allclose(m.encode_text(ids, mask)[0], torch.nn.functional.normalize(hidden, dim=-1), atol=1e-6)
    with pytest.raises(ModelError, match="text-pooling must be one of first, mean, got 'max'"):
        build_model(tiny_cfg(tiny_data, **{"text-pooling": "max"}))
