"""Self-supervised pretraining of the offline default encoder (a small timm ViT): DINO/iBOT, VICReg, SimCLR."""

from pipeline.ssl.augment import ViewAugment, augment_view, crop_thetas, multi_crop
from pipeline.ssl.config import OBJECTIVES, SSLConfig
from pipeline.ssl.data import generator_batches, image_batches, shard_batches
from pipeline.ssl.dino import DINO, DINOHead, momentum_at, teacher_temp_at
from pipeline.ssl.joint import JointEmbedding, match_views, sample_patch_grid
from pipeline.ssl.pretrain import build_ssl_model, pretrain_encoder, train_config
from pipeline.ssl.vit import ENCODER_KIND, build_vit, export_encoder, load_encoder, vit_kwargs

__all__ = [
    "DINO",
    "DINOHead",
    "ENCODER_KIND",
    "OBJECTIVES",
    "JointEmbedding",
    "SSLConfig",
    "ViewAugment",
    "augment_view",
    "build_ssl_model",
    "build_vit",
    "crop_thetas",
    "export_encoder",
    "generator_batches",
    "image_batches",
    "load_encoder",
    "match_views",
    "momentum_at",
    "multi_crop",
    "pretrain_encoder",
    "sample_patch_grid",
    "shard_batches",
    "teacher_temp_at",
    "train_config",
    "vit_kwargs",
]
