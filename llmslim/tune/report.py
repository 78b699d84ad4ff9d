"""tune.md and tune.png from tune.json: the chosen grid per layer, predicted and measured quality and
size, and the predicted Pareto front against the uniform settings."""

from __future__ import annotations

import json
from pathlib import Path

from ..quant.anchors import factor
from ..util import atomic_write_text


def markdown(t: dict) -> str:
    lines = [f"# llmslim tune: budget {t['budget']} -- {'met' if t['met'] else 'MISSED'}", "",
             f"Held-out text: {t['eval']['text']} (evaluation part), {t['eval']['windows']} windows of "
             f"{t['eval']['seqlen']} tokens; KL is KL(original || model) per token, nats.", "",
             "| attempt | target | predicted KL | measured KL | perplexity (original) | predicted MB | measured MB "
             "| bits/weight | met |", "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for i, a in enumerate(t["attempts"], 1):
        lines.append(f"| {i} | {a['internal']:.4g} | {a['predicted_kl']:.4f} | {a['measured_kl']:.4f} | "
                     f"{a['perplexity']:.3f} ({a['baseline_perplexity']:.3f}) | {a['predicted_bytes'] / 1e6:.2f} | "
                     f"{a['measured_bytes'] / 1e6:.2f} | {a['bpw']:.3f} | {'yes' if a['met'] else 'no'} |")
    lines += ["", "## Uniform settings (predicted)", "", "| setting | predicted KL | MB | bits/weight |",
              "|---|---:|---:|---:|"]
    lines += [f"| {u['setting']}{' *' if u.get('substituted') else ''} | {u['predicted_kl']:.4f} | "
              f"{u['bytes'] / 1e6:.2f} | {u['bpw']:.3f} |" for u in t["uniform_predicted"]]
    if any(u.get("substituted") for u in t["uniform_predicted"]):
        lines += ["", "\\* some layers cannot take the group size (it does not divide them): they are priced at "
                  "the same bits and their largest smaller group."]
    kl = {x["name"]: dict(zip(x["candidates"], x["kl"], strict=True)) for x in t["layers"]}
    lines += ["", "## Per layer", "", "| layer | bits:group | predicted KL of this layer |", "|---|---|---:|"]
    lines += [f"| {n} | {c} | {kl[n][c]:.3g} |" for n, c in t["choice"].items()]
    s = t["sensitivity"]
    lines += ["", f"Sensitivities: {'read from the cache' if s['cached'] else 'measured'} ({s['cache']}); "
              f"Fisher on {s['fisher_tokens']} tokens; seconds {s['seconds']}."]
    anchors = t.get("anchors") or []
    if anchors:
        lines += ["", "Anchors: each unit measured exactly (KL with only that unit quantized, calibration "
                  "sequences kept out of the pass) at the lowest bit width; its predictions there are scaled by its "
                  "measured / predicted over the typical unit's at the reference grid (the median of a sample measured there, "
                  "in float32), log-linearly less up to the reference's bits. The ratios' spread, and the units they "
                  "moved most:", "",
                  "| bits | units | median measured / predicted | min | max |", "|---:|---:|---:|---:|---:|"]
        for bits in sorted({r["bits"] for r in anchors}):
            f = sorted(_factor(r) for r in anchors if r["bits"] == bits)
            lines.append(f"| {bits} | {len(f)} | {f[len(f) // 2]:.3g} | {f[0]:.3g} | {f[-1]:.3g} |")
        lines += ["", "| unit | bits | predicted | measured | measured / predicted |", "|---|---:|---:|---:|---:|"]
        for r in sorted((r for r in anchors if not r.get("scale")), key=_factor, reverse=True)[:8]:
            lines.append(f"| {' + '.join(r['names'])} | {r['bits']} | {r['predicted']:.3g} | {r['measured']:.3g} | "
                         f"{_factor(r):.3g} |")
    cal = s.get("calibration")
    if cal:
        where = "calibration tokens kept out of the pass" if cal.get("unseen") else "calibration tokens"
        lines += ["", f"Calibration (predicted KL = {cal['a']:.4g} x (sum of the layers' predictions)^{cal['b']:.4g}), "
                  f"measured on {cal['tokens']} {where}:", "",
                  "| reference model | sum of layer predictions | measured KL | calibrated prediction |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {p['setting']} | {p['predicted']:.4g} | {p['measured']:.4g} | "
                  f"{cal['a'] * p['predicted'] ** cal['b']:.4g} |" for p in cal["points"]]
    return "\n".join(lines) + "\n"


def _factor(r: dict) -> float:
    return factor(r["predicted"], r["measured"])


def plot(t: dict, path: Path) -> bool:
    """The PNG (False when matplotlib, the ``eval`` extra, is not installed)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    f = t["front_predicted"]
    ax.plot([p["bytes"] / 1e6 for p in f], [max(p["predicted_kl"], 1e-6) for p in f], "-", color="tab:blue",
            label="mixed, predicted front")
    for u in t["uniform_predicted"]:
        ax.plot(u["bytes"] / 1e6, max(u["predicted_kl"], 1e-6), "s", color="tab:gray")
        ax.annotate(u["setting"] + (" *" if u.get("substituted") else ""), (u["bytes"] / 1e6, max(u["predicted_kl"], 1e-6)), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.plot([], [], "s", color="tab:gray", label="uniform bits:group, predicted")
    for i, a in enumerate(t["attempts"], 1):
        ax.plot(a["predicted_bytes"] / 1e6, max(a["predicted_kl"], 1e-6), "o", color="tab:orange",
                label="chosen, predicted" if i == 1 else None)
        ax.plot(a["measured_bytes"] / 1e6, max(a["measured_kl"], 1e-6), "*", ms=12, color="tab:red",
                label="chosen, measured (held-out)" if i == 1 else None)
    if t["budget_kind"] == "kl":
        ax.axhline(t["budget_value"], color="tab:red", ls=":", lw=1, label="budget")
    elif t["budget_kind"] == "size":
        ax.axvline(t["budget_value"] / 1e6, color="tab:red", ls=":", lw=1, label="budget")
    ax.set_yscale("log")
    ax.set_xlabel("weights, MB")
    ax.set_ylabel("KL(original || model), nats/token")
    ax.set_title(f"budget {t['budget']}")
    ax.legend(fontsize=8)
    names = list(t["choice"])
    bits = [int(t["choice"][n].split(":")[0]) for n in names]
    groups = [t["choice"][n].split(":")[1] for n in names]
    colors = {2: "tab:red", 3: "tab:orange", 4: "tab:blue", 8: "tab:green"}
    bx.bar(range(len(names)), bits, color=[colors.get(b, "tab:gray") for b in bits])
    bx.set_xlabel("quantized layer (model order)")
    bx.set_ylabel("bits")
    bx.set_title("chosen bits per layer (group size in the table)")
    if len(names) <= 40:
        bx.set_xticks(range(len(names)), [f"{n.split('.')[-1]} g{g}" for n, g in zip(names, groups, strict=True)],
                      rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(folder: Path) -> None:
    t = json.loads((Path(folder) / "tune.json").read_text())
    atomic_write_text(Path(folder) / "tune.md", markdown(t))
    if not plot(t, Path(folder) / "tune.png"):
        print("note: tune.png not written: pip install 'llmslim[eval]' (matplotlib) for the plot")
