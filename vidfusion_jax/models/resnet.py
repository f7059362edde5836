"""torchvision's ResNet-18 classifier in Flax (frozen, inference BatchNorm), for TemCoCo's feaCD.

Channels-last (N, H, W, 3) in, the 1000 logits out. Parameter names follow the torchvision state dict
(`layer1.0.conv1.weight` -> `layer1_0/conv1/kernel`, `fc.weight` -> `fc/kernel`) with SEA-RAFT's naming
helpers, so `weights.from_torch_state_dict("resnet18", torch.load(path))` imports a user's file.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidfusion_jax.models import sea_raft

STAGE_FEATURES = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (2, 2, 2, 2)


class ResNet18(nn.Module):
  """torchvision `resnet18()` in `.eval()` mode: no normalisation of the input (feed it as given)."""
  num_classes: int = 1000
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(64, (7, 7), strides=2, padding=3, use_bias=False, dtype=self.dtype,
                name="conv1")(x)
    x = nn.relu(sea_raft.BatchNorm(self.dtype, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (features, count) in enumerate(zip(STAGE_FEATURES, BLOCKS_PER_STAGE)):
      for i in range(count):
        x = sea_raft.BasicBlock(features, 2 if stage and not i else 1, self.dtype, use_bias=False,
                                branch_relu=False, name=f"layer{stage + 1}_{i}")(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)


def drop_counters(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The state dict without BatchNorm's `num_batches_tracked` (unused in inference)."""
  return {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}


def abstract_params(state_dict: Mapping[str, np.ndarray]) -> Any:
  classes = np.shape(state_dict["fc.weight"])[0] if "fc.weight" in state_dict else 1000
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(ResNet18(classes).init, jax.random.key(0), x)["params"]
