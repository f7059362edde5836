"""TemCoCo training: the reference recipe (specs/temcoco.md section (b)) and a `tiny` variant.

  python -m vidfusion_jax.train --config=configs/temcoco.py --workdir=/tmp/tc \
      --config.data.path=/data/m3svd_tfrecord \
      --config.teachers.vgg19=/ckpt/vgg19-dcbb9e9d.pth \
      --config.teachers.dinov2=/ckpt/dinov2_vitl14_pretrain.pth
  python -m vidfusion_jax.train --config=configs/temcoco.py:tiny --workdir=/tmp/tc_tiny \
      --config.data.path=/tmp/m3svd_mini_tfrecord --config.teachers.vgg19=... \
      --config.teachers.dinov2=...

The teacher checkpoints are the official PyTorch files (see docs/temcoco.md): torchvision's VGG19
IMAGENET1K_V1 weights and facebookresearch's `dinov2_vitl14_pretrain.pth`.
"""

import ml_collections

# The reference constructor `Fusion()`: n_feat 32 is the only width it supports.
FUSION_KWARGS = {"n_feat": 32}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """Reference recipe; `variant` "tiny" shrinks data and schedule to CPU-minutes (the network is
  fixed; a shallower DINOv2 checkpoint of width 1024 can stand in for ViT-L/14 in tests)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "temcoco"
  config.model.config = dict(FUSION_KWARGS)
  config.model.dtype = "float32"  # compute dtype; "bfloat16" keeps float32 params
  config.model.remat = False
  # "auto": the CPU memory orderings on CPU, plain flax.linen on GPU/TPU (models/schedule.py).
  config.model.schedule = "auto"
  # jax.checkpoint policy of `remat` in the plain schedule: full, dots, dots_with_no_batch_dims.
  config.model.remat_policy = "full"
  # The reference fine-tunes its released checkpoint (VideoFusionNet_495000.pth); set it here.
  config.model.init_checkpoint = ""

  config.teachers = ml_collections.ConfigDict()
  config.teachers.distillation = True  # False: fusion loss only, no teacher checkpoints needed
  config.teachers.vgg19 = ""  # torchvision vgg19 IMAGENET1K_V1 state dict (.pth)
  config.teachers.dinov2 = ""  # facebookresearch dinov2_vitl14_pretrain.pth
  config.teachers.dinov2_num_heads = 16  # ViT-L/14 (the head count is not in the checkpoint)

  config.data = ml_collections.ConfigDict()
  config.data.source = "tfrecord"  # or "synthetic": random clips, for benchmarks and tests
  config.data.path = ""
  config.data.train_split = "train"
  config.data.eval_split = "val"
  config.data.clip_length = 10
  config.data.crop_size = 224  # the DINOv2 target grid is 14x14 at this size
  config.data.worker_count = 0
  config.data.flip = False  # the reference's augment call is commented out
  config.data.rotate = False
  config.data.degrade = "auto"

  config.batch_size = 3  # global; the reference runs 3 per GPU on one GPU (train.py)
  config.grad_accum_steps = 1
  config.total_steps = 500_000

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 5e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0  # Adam, not AdamW
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.schedule = "step_decay"  # lr x0.95 after every 200th step
  config.optimizer.warmup_steps = 0  # "warmup_cosine" only
  config.optimizer.cosine_period = 0  # "warmup_cosine" only
  config.optimizer.min_learning_rate = 0.0  # "warmup_cosine" only
  config.optimizer.decay_every_steps = 200
  config.optimizer.decay_rate = 0.95

  config.mesh = ml_collections.ConfigDict()
  config.mesh.axis_names = ("data", "fsdp")
  config.mesh.shape = (-1, 1)

  config.sharding = ml_collections.ConfigDict()
  config.sharding.batch_axes = ("data", "fsdp")
  config.sharding.param_rules = ((".*", "fsdp"),)
  config.sharding.min_sharded_size = 2**14

  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.keep_best_checkpoints = 1
  config.best_metric = "psnr_fused"
  config.best_metric_mode = "max"
  config.async_checkpointing = True

  config.eval = ml_collections.ConfigDict()
  config.eval.clip_length = 30  # the reference test clips (num_frame 30)
  config.eval.max_sequences = 0  # 0: all
  config.eval.crop_size = 0  # 0: full frames (H, W must be multiples of 16); else a centre crop
  config.eval.fusion_metrics = ()  # names for vidfusion_jax.metrics.compute; () skips them
  config.eval.num_grid_frames = 2

  if variant == "tiny":
    config.data.clip_length = 3
    config.data.crop_size = 32
    config.batch_size = 1
    config.total_steps = 2
    config.optimizer.learning_rate = 1e-4
    config.optimizer.decay_every_steps = 1
    config.sharding.min_sharded_size = 0
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 1
    config.eval.clip_length = 2
    config.eval.max_sequences = 1
    config.eval.crop_size = 32
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/temcoco.py; known: 'tiny'")
  return config
