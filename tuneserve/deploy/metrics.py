"""One Prometheus page from many: each replica's tuneserve metrics, each sample labelled with its replica."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def merge_metrics(pages: dict[str, str], label: str = "replica") -> str:
    """Prometheus text exposition of every replica's page (replica id -> text): one HELP/TYPE per family,
    every sample with `label="<replica id>"` added."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for rid in sorted(pages):
        for fam in text_string_to_metric_families(pages[rid]):
            _, _, lines = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                labels = {**s.labels, label: rid}
                body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
                lines.append(f"{s.name}{{{body}}} {floatToGoString(s.value)}")
    out = []
    for name, (kind, doc, lines) in families.items():
        out.append(f"# HELP {name} {_escape(doc)}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n"
