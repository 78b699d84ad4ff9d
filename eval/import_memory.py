"""What a serving process holds before any weight: resident memory of import stacks, each in a fresh process.

Issue 16's memory goal compares whole ``llmslim serve`` processes (4-bit vs float32); both carry the
same base of imports and tokenizer. This measures where that base comes from: each row imports a
stack in its own interpreter and reports VmRSS (MiB, after handing freed heap pages back) and whether ``torch._dynamo``, ``sympy`` and
``transformers.modeling_utils`` got imported on the way.

    python eval/import_memory.py --json eval/results/import_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROBE = """
import json, sys
{code}
from llmslim.util import release_free_memory
release_free_memory()  # glibc's free pages back, as eval/serve_memory.py's process without a model does
rss = int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024
print(json.dumps({{"rss_mib": rss, "torch._dynamo": "torch._dynamo" in sys.modules, "sympy": "sympy" in sys.modules,
                  "transformers.modeling_utils": "transformers.modeling_utils" in sys.modules}}))
"""

SERVER = "import llmslim.server.app, llmslim.server.engine, llmslim.server.kvbatch, llmslim.runtime.fast, llmslim.runtime.lean"


def rows(folder: str) -> dict[str, str]:
    f = repr(folder)
    return {
        "torch": "import torch",
        "torch + transformers (package only)": "import torch, transformers",
        "torch + AutoConfig.from_pretrained": f"import torch\nfrom transformers import AutoConfig\nAutoConfig.from_pretrained({f})",
        "torch + AutoTokenizer.from_pretrained": f"import torch\nfrom transformers import AutoTokenizer\nAutoTokenizer.from_pretrained({f})",
        "torch + transformers.modeling_utils": "import torch, transformers.modeling_utils",
        "server modules + AutoConfig + AutoTokenizer (what llmslim serve imports today)":
            f"import torch\n{SERVER}\nfrom transformers import AutoConfig, AutoTokenizer\n"
            f"c = AutoConfig.from_pretrained({f})\nAutoTokenizer.from_pretrained({f})\nimport transformers.modeling_utils",
        "server modules + config as a plain PretrainedConfig + AutoTokenizer(config=it) (no config class)":
            f"import torch\n{SERVER}\nfrom transformers import AutoTokenizer, PretrainedConfig\n"
            f"c = PretrainedConfig.from_dict(json.load(open({f} + '/config.json')))\n"
            f"AutoTokenizer.from_pretrained({f}, config=c)",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    from llmslim.models import resolve

    folder = str(resolve(args.model))
    out = {"model": args.model, "rows": {}}
    for name, code in rows(folder).items():
        runs = []
        for _ in range(args.repeats):
            r = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], capture_output=True, text=True,
                               check=True, cwd=ROOT)
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        rss = sorted(x["rss_mib"] for x in runs)
        out["rows"][name] = {"rss_mib_median": rss[len(rss) // 2], "rss_mib": rss,
                             **{k: v for k, v in runs[0].items() if k != "rss_mib"}}
        row = out["rows"][name]
        print(f"{row['rss_mib_median']:7.1f} MiB  dynamo={row['torch._dynamo']!s:5} sympy={row['sympy']!s:5} "
              f"modeling_utils={row['transformers.modeling_utils']!s:5}  {name}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
