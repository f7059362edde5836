"""PyTorch state-dict names -> Flax param paths, shared by the networks' importers."""


def torch_name_to_flax_path(name: str, ndim: int, kernel_ndims: tuple[int, ...]) -> tuple[str, ...]:
  """`layer1.0.conv1.weight` -> ('layer1_0', 'conv1', 'kernel'): a numeric part joins the name
  before it (`nn.Sequential` indices), and a `weight` with one of `kernel_ndims` dimensions (the
  network's convolutions / linear layers) becomes `kernel`; other weights (norms) stay `weight`."""
  path: list[str] = []
  for part in name.split("."):
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  if path[-1] == "weight" and ndim in kernel_ndims:
    path[-1] = "kernel"
  return tuple(path)
