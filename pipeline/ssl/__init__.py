"""Self-supervised pretraining of the offline default encoder (a small timm ViT), DINO/iBOT-style."""

from pipeline.ssl.augment import ViewAugment, augment_view, multi_crop
from pipeline.ssl.dino import DINO, DINOHead, SSLConfig, momentum_at, teacher_temp_at
from pipeline.ssl.pretrain import image_batches, pretrain_encoder, train_config
from pipeline.ssl.vit import ENCODER_KIND, build_vit, export_encoder, load_encoder, vit_kwargs

__all__ = [
    "DINO",
    "DINOHead",
    "ENCODER_KIND",
    "SSLConfig",
    "ViewAugment",
    "augment_view",
    "build_vit",
    "export_encoder",
    "image_batches",
    "load_encoder",
    "momentum_at",
    "multi_crop",
    "pretrain_encoder",
    "teacher_temp_at",
    "train_config",
    "vit_kwargs",
]
