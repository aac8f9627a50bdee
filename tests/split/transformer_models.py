"""Tiny transformers for the cut tests (random weights, nothing downloaded): Hugging Face GPT-2, BERT, ViT and
Llama from small configurations, and a classifier around ``nn.TransformerEncoder``. Dropout is 0 everywhere (the
layers' mode is fixed when a model is exported; see splitnn.split.exported)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, SEQ, WIDTH, CLASSES = 50, 16, 32, 3


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def gpt2(layers: int = 4, tie: bool = False) -> nn.Module:
    t = _quiet()
    cfg = t.GPT2Config(
        n_layer=layers,
        n_embd=WIDTH,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=SEQ,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
    )
    return t.GPT2LMHeadModel(cfg)


def bert(layers: int = 4) -> nn.Module:
    t = _quiet()
    cfg = t.BertConfig(
        num_hidden_layers=layers,
        hidden_size=WIDTH,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        num_labels=CLASSES,
        pad_token_id=0,
    )
    return t.BertForSequenceClassification(cfg)


def vit(layers: int = 4) -> nn.Module:
    t = _quiet()
    cfg = t.ViTConfig(
        num_hidden_layers=layers,
        hidden_size=WIDTH,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=CLASSES,
    )
    return t.ViTForImageClassification(cfg)


def llama(layers: int = 4) -> nn.Module:
    t = _quiet()
    cfg = t.LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=WIDTH,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        use_cache=False,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return t.LlamaForCausalLM(cfg)


class EncoderClassifier(nn.Module):
    """Token embeddings, a learned position table, ``nn.TransformerEncoder`` and a linear head on the mean."""

    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(torch.randn(SEQ, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(ids) + self.pos)
        return self.head(h.mean(dim=1))


def encoder_classifier(layers: int = 4) -> nn.Module:
    return EncoderClassifier(layers)


class _TimmAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


class TimmStyleViT(nn.Module):
    """timm's VisionTransformer in small (patch embedding by convolution, class token, learned positions,
    ``blocks`` an ``nn.Sequential`` of blocks taking ``attn_mask=None``, final norm, head on the class token)."""

    def __init__(self, depth: int = 4, image: int = 16, patch: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, WIDTH, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, WIDTH) * 0.02)
        self.blocks = nn.Sequential(*[_TimmBlock(WIDTH, 4) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(WIDTH, eps=1e-6), nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def timm_vit(layers: int = 4) -> nn.Module:
    return TimmStyleViT(layers)
