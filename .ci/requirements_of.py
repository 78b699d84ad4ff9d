"""Print an installed distribution's requirements, one a line, without extras and without the
ones named after ``--without`` (the Makefile installs GPTQModel with ``--no-deps`` and then
these, keeping torch at the project's pin).

    python .ci/requirements_of.py gptqmodel --without torch > reqs.txt
"""

import argparse
import importlib.metadata as md

from pip._vendor.packaging.requirements import Requirement  # every venv has pip; not every one packaging

parser = argparse.ArgumentParser()
parser.add_argument("dist")
parser.add_argument("--without", nargs="*", default=[])
args = parser.parse_args()
for line in md.requires(args.dist) or []:
    req = Requirement(line)
    if req.name.lower() in {w.lower() for w in args.without}:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra, or another Python version
    req.marker = None
    print(req)
