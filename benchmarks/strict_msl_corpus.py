"""The strict MSL check over a corpus of .metal files: how many it accepts, and
why it rejects the others (first error of each file, grouped).

    python benchmarks/strict_msl_corpus.py CORPUS_DIR [-I INCLUDE_DIR ...] [-v]

Each file is checked with its own directory, its include/ and the -I
directories on the include path. For a library that includes its headers
from its repository root ("lib/kernels/utils.h"), pass
that root with -I. Files that Apple's compiler builds are expected to pass:
every rejection is either a limit of the check or code that needs an SDK
header the strict library does not declare.
"""

import argparse
import collections
import importlib.util
import os
import re
import sys
import time


def _load_strict():
    # Load strict.py alone: importing my_mps_ops would import torch and the extension.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "my_mps_ops", "emulator", "strict.py")
    spec = importlib.util.spec_from_file_location("msl_strict", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["msl_strict"] = module
    spec.loader.exec_module(module)
    return module


def _cause(message: str) -> str:
    """A message with its specifics removed, to group files by cause."""
    message = re.sub(r"'[^']*'", "'...'", message)
    message = re.sub(r"\d+", "N", message)
    return message[:150]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus")
    parser.add_argument("-I", dest="include_dirs", action="append", default=[])
    parser.add_argument("-v", "--verbose", action="store_true", help="print every rejected file's first errors")
    args = parser.parse_args()
    strict = _load_strict()
    if strict.find_clang() is None:
        print("no clang found", file=sys.stderr)
        return 2
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(args.corpus) for f in names
                   if f.endswith(".metal"))
    accepted, causes = 0, collections.defaultdict(list)
    start = time.perf_counter()
    for path in files:
        here = os.path.dirname(os.path.abspath(path))
        dirs = [d for d in (here, os.path.join(here, "include"), *args.include_dirs) if os.path.isdir(d)]
        with open(path) as f:
            source = f.read()
        rel = os.path.relpath(path, args.corpus)
        try:
            strict.check_msl(source, rel, dirs)
        except strict.MSLStrictError as e:
            first = e.errors[0] if e.errors else None
            causes[_cause(first.message if first else str(e))].append(rel)
            if args.verbose:
                print(f"--- {rel}\n" + "\n".join(str(d) for d in e.errors[:5]))
        else:
            accepted += 1
    elapsed = time.perf_counter() - start
    print(f"accepted {accepted} of {len(files)} files ({elapsed:.1f} s)")
    for cause, names in sorted(causes.items(), key=lambda kv: -len(kv[1])):
        print(f"{len(names):4d}  {cause}")
        for n in names:
            print(f"        {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
