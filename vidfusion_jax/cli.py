"""The command-line convention of every entry point: absl flags spelled in snake_case.

Each command defines its flags on its own `flags.FlagValues` (so that commands imported into one
process, e.g. a test session, do not collide) and parses them with `parse`; `vidfusion_jax.train`
keeps absl's global flags and `app.run` and parses them with `app_flags_parser`. Both
- print the command's usage and flags on stdout and exit with status 0 for `--help` (or `-h`);
- accept the spellings of the previous release for one more release, with a warning on stderr:
  `--max-frames` for `--max_frames`, `--no-stretch` for `--nostretch`;
- report a bad command line on stderr, with a pointer to `--help`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from absl import flags

HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")
USAGE_ERROR_STATUS = 2
OWN_MODULES = ("vidfusion_jax", "data_prep", "benchmarks", "__main__")


def _is_own(module: str) -> bool:
  return module.startswith(OWN_MODULES) or module.endswith(".py")


def help_text(flag_values: flags.FlagValues, usage: str) -> str:
  """`usage` followed by the flags this project defines (not those of absl, Grain, Orbax, ...)."""
  modules = [m for m in flag_values.flags_by_module_dict() if _is_own(m)]
  listings = [flag_values.module_help(m).strip().split("\n", 1)[1] for m in modules]  # No name.
  return "\n".join([usage.strip(), "", "flags:", *listings]) + "\n"


def _is_boolean(flag_values: flags.FlagValues, name: str) -> bool:
  return name in flag_values and flag_values[name].boolean


def current_spelling(arg: str, flag_values: flags.FlagValues) -> str:
  """`arg` in this release's spelling: `--old-name=v` -> `--old_name=v`, `--no-x` -> `--nox`."""
  if not arg.startswith("--") or arg == "--":
    return arg
  name, sep, value = arg[2:].partition("=")
  if name in flag_values or (name.startswith("no") and _is_boolean(flag_values, name[2:])):
    return arg
  new = name.replace("-", "_")
  if new.startswith("no_") and _is_boolean(flag_values, new[3:]):
    new = "no" + new[3:]
  if new not in flag_values and not (new.startswith("no") and _is_boolean(flag_values, new[2:])):
    return arg  # Not an old spelling: absl reports the unknown flag.
  print(f"warning: --{name} is deprecated and will be removed in the next release; use --{new}",
        file=sys.stderr)
  return f"--{new}{sep}{value}"


def current_spellings(argv: Sequence[str], flag_values: flags.FlagValues) -> list[str]:
  """`argv` (without the program name) with old flag spellings replaced; stops at `--`."""
  if "--" in argv:
    end = list(argv).index("--")
    return [current_spelling(a, flag_values) for a in argv[:end]] + list(argv[end:])
  return [current_spelling(a, flag_values) for a in argv]


def usage_error(prog: str, message: str) -> None:
  """Reports a bad command line and exits with status 2."""
  print(f"{prog}: error: {message}\nRun `{prog} --help` for the flags.", file=sys.stderr)
  sys.exit(USAGE_ERROR_STATUS)


def parse(argv: Sequence[str] | None, define_flags: Callable[[flags.FlagValues], None], *,
          prog: str, usage: str) -> argparse.Namespace:
  """Flags of a command defined by `define_flags`, parsed from `argv` (default: sys.argv[1:]).

  Returns their values as a namespace (`args.max_frames`, ...). Positional arguments are refused.
  """
  flag_values = flags.FlagValues()
  define_flags(flag_values)
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(arg in HELP_FLAGS for arg in argv):
    print(help_text(flag_values, usage), end="")
    sys.exit(0)
  try:
    rest = flag_values([prog, *current_spellings(argv, flag_values)])
  except flags.Error as error:
    usage_error(prog, str(error))
  if len(rest) > 1:
    usage_error(prog, f"unexpected arguments {rest[1:]}; every input is a --flag")
  return argparse.Namespace(**flag_values.flag_values_dict())


def app_flags_parser(usage: str) -> Callable[[list[str]], list[str]]:
  """`flags_parser` for `absl.app.run` with absl's global flags, following the convention above."""

  def parse_global_flags(argv: list[str]) -> list[str]:
    if any(arg in HELP_FLAGS for arg in argv[1:]):
      print(help_text(flags.FLAGS, usage), end="")
      sys.exit(0)
    try:
      return flags.FLAGS([argv[0], *current_spellings(argv[1:], flags.FLAGS)])
    except flags.Error as error:
      usage_error(argv[0], str(error))

  return parse_global_flags
