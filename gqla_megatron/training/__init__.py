"""Pretraining on Megatron-Core: recipes, models for GQLA and same-shape MLA/GQA baselines,
data (indexed datasets, mock data, preprocessing), checkpoints with exact resume, tracking
(W&B, TensorBoard) and the training loop. The CLI is ``gqla-pretrain`` / pretrain/pretrain_gqla.py."""
