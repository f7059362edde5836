"""TemCoCo gradients: directional derivatives of `losses.temcoco_loss` against float64 central
differences, for every parameter group, for the fusion loss and each distillation term.

The loss is differentiable almost everywhere, not everywhere: it has kinks (one-sided derivatives)
where an L1 argument or a LeakyReLU input is 0, where `maximum` ties (intensity and gradient
targets), where Y/Cb/Cr hit the [0, 1] clamp, where a deformable sample position is an integer
(bilinear interpolation switches pixels; JAX takes the derivative from above) or reaches -1 or
H / W (the sample's support leaves the image), and where a frame-difference norm is below the
cosine similarity's 1e-8 clamp. Random inputs and parameters almost surely avoid them, so the
differences below meet the analytic derivatives to 1e-4 relative (plus their float64 rounding).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidfusion_jax import losses
from vidfusion_jax.models import teachers
from vidfusion_jax.models import temcoco

SHAPE = (1, 3, 16, 16, 3)  # T=3: frame 2 takes the DCN neighbour path; 16x16 is the smallest size
TERMS = ("loss_fusion", "visual_vgg", "semantic_dino")
# Along a random normal direction, in float64. The loss has so many kinks (see above) that larger
# steps cross some: the error is linear in the step (3e-3 relative at 1e-5, up to 3e-4 at 1e-7).
STEP = 1e-8
RTOL = 1e-4
# Plus the float64 rounding of the difference, ROUNDING * |term| / STEP: it decides for the smallest
# derivatives (measured errors of those: 0.4 to 1.1 times eps * |term| / STEP).
ROUNDING = 4 * np.finfo(np.float64).eps


def _groups() -> list[str]:
  """Parameter groups: the children of every top-level module (e.g. `DCN_1/off2d_1`), and `dec`."""
  params = temcoco.abstract_params()
  return sorted(f"{top}/{child}" for top, sub in params.items() for child in sub)


def _in_group(path, group: str) -> bool:
  return "/".join(k.key for k in path[:2]) == group


@pytest.fixture(scope="module")
def derivatives() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """{group: (analytic, numeric, term values)} directional derivatives of the three terms."""
  rng = np.random.default_rng(0)
  ir, vis, gt_ir, gt_vi = (rng.random(SHAPE) for _ in range(4))
  frames = gt_vi.reshape(-1, *SHAPE[2:]).astype(np.float32)
  # Small random teachers: VGG19 features and a one-block, 1024-wide DINOv2 (the heads' width).
  dino = teachers.DinoVisionTransformer(embed_dim=1024, depth=1, num_heads=16)
  frozen = teachers.Teachers(
      vgg=teachers.VGG19Features().init(jax.random.key(1), frames)["params"],
      dino=dino.init(jax.random.key(2), jnp.zeros((1, 14, 14, 3)))["params"], dino_num_heads=16)
  targets = jax.jit(teachers.distillation_targets)(frozen, gt_ir.astype(np.float32),
                                                   gt_vi.astype(np.float32))
  model = temcoco.TemCoCo()
  params = model.init(jax.random.key(0), frames[None, :1], frames[None, :1])["params"]
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    targets = {k: np.asarray(v, np.float64) for k, v in targets.items()}

    def weighted_terms(p, weights):
      _, named = losses.temcoco_loss(model.apply({"params": p}, ir, vis), gt_ir, gt_vi, targets)
      values = jnp.stack([named[k] for k in TERMS])
      return weights @ values, values

    # One compiled function gives the terms (for the differences) and the gradient of each.
    terms_and_grad = jax.jit(jax.value_and_grad(weighted_terms, has_aux=True))
    grads = [terms_and_grad(params, row)[1] for row in np.eye(len(TERMS))]
    terms = lambda p: terms_and_grad(p, np.zeros(len(TERMS)))[0][1]
    values = np.asarray(terms(params))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    result = {}
    for group in _groups():
      direction = jax.tree_util.tree_unflatten(treedef, [
          rng.normal(size=p.shape) if _in_group(path, group) else np.zeros(p.shape)
          for path, p in leaves])
      analytic = [sum(float(jnp.vdot(g, d)) for g, d in
                      zip(jax.tree.leaves(grad), jax.tree.leaves(direction))) for grad in grads]
      shifted = lambda sign: terms(jax.tree.map(lambda p, d: p + sign * STEP * d, params,
                                                direction))
      numeric = (shifted(1) - shifted(-1)) / (2 * STEP)
      result[group] = (np.asarray(analytic), np.asarray(numeric), values)
  return result


@pytest.mark.slow
@pytest.mark.parametrize("group", _groups())
def test_directional_derivative_matches_central_difference(derivatives, group):
  analytic, numeric, values = derivatives[group]
  assert analytic.dtype == np.float64
  assert analytic[0] != 0.0, f"{group} does not reach the fusion loss"
  for term, a, n, value in zip(TERMS, analytic, numeric, values):
    tolerance = RTOL * abs(a) + ROUNDING * abs(value) / STEP
    assert abs(a - n) <= tolerance, f"{group}: {term} analytic {a:.8g} numeric {n:.8g}"


def test_every_parameter_is_in_a_group():
  params = temcoco.abstract_params()
  grouped = sum(jax.tree_util.tree_reduce(lambda n, leaf: n + leaf.size, params[top][child], 0)
                for top, child in (g.split("/") for g in _groups()))
  assert grouped == sum(leaf.size for leaf in jax.tree.leaves(params)) == 19_213_417
