"""The paper's numbers (reference section 7), as tables to put beside ours."""

from __future__ import annotations

import math

import pandas as pd

__all__ = ["TABLE1_CIFAR10", "TABLE2_IMAGENET", "TABLE3_UBWP", "TABLE4_UBWC", "VERIFICATION_TABLES", "METHOD_LABELS",
           "paper_table", "paper_verification"]

#: Display names of the methods, in the paper's order.
METHOD_LABELS = {
    "no-attack": "No Attack",
    "badnets": "BadNets",
    "blended": "Blended",
    "wanet": "WaNet",
    "ubw-p": "UBW-P",
    "label-consistent": "Label-Consistent",
    "sleeper-agent": "Sleeper Agent",
    "ubw-c": "UBW-C",
}

_NAN = math.nan

# (method, BA %, ASR-A %, ASR-C %, D_p)
_T1 = [
    ("no-attack", 92.53, _NAN, _NAN, _NAN),
    ("badnets", 91.52, 100.0, 100.0, 0.0000),
    ("blended", 91.61, 100.0, 100.0, 0.0000),
    ("wanet", 90.48, 95.50, 95.33, 0.1979),
    ("ubw-p", 90.59, 92.30, 92.51, 2.2548),
    ("label-consistent", 82.94, 96.00, 95.80, 0.9280),
    ("sleeper-agent", 86.06, 70.60, 54.46, 1.0082),
    ("ubw-c", 86.99, 89.80, 87.56, 1.2641),
]
_T2 = [
    ("no-attack", 67.30, _NAN, _NAN, _NAN),
    ("badnets", 65.64, 100.0, 100.0, 0.0000),
    ("blended", 65.28, 88.00, 85.37, 0.3669),
    ("wanet", 62.56, 78.00, 73.17, 0.7124),
    ("ubw-p", 62.60, 82.00, 82.61, 2.7156),
    ("label-consistent", 62.36, 30.00, 2.78, 1.2187),
    ("sleeper-agent", 56.92, 6.00, 2.31, 1.0943),
    ("ubw-c", 59.64, 74.00, 60.00, 2.4010),
]


def _table(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["method", "BA", "ASR-A", "ASR-C", "D_p"]).set_index("method")
    df.index = df.index.map(METHOD_LABELS)
    return df


#: Table 1: watermark performance on CIFAR-10 (BA, ASR-A, ASR-C in %).
TABLE1_CIFAR10 = _table(_T1)
#: Table 2: watermark performance on the ImageNet subset (BA, ASR-A, ASR-C in %).
TABLE2_IMAGENET = _table(_T2)

_SCEN = ["Independent-T", "Independent-M", "Malicious"]
#: Table 3: verification via UBW-P (Delta P, p-value) on CIFAR-10 and ImageNet.
TABLE3_UBWP = pd.DataFrame(
    {
        ("CIFAR-10", "Delta P"): [-0.0269, 0.0024, 0.7568],
        ("CIFAR-10", "p-value"): [1.0000, 1.0000, 1e-36],
        ("ImageNet", "Delta P"): [0.1281, 0.0241, 0.8000],
        ("ImageNet", "p-value"): [0.9666, 1.0000, 1e-10],
    },
    index=_SCEN,
)
#: Table 4: verification via UBW-C (Delta P, p-value) on CIFAR-10 and ImageNet.
TABLE4_UBWC = pd.DataFrame(
    {
        ("CIFAR-10", "Delta P"): [0.1874, 0.0171, 0.6115],
        ("CIFAR-10", "p-value"): [0.9688, 1.0000, 1e-14],
        ("ImageNet", "Delta P"): [0.0588, 0.1361, 0.4836],
        ("ImageNet", "p-value"): [0.9999, 0.9556, 0.0032],
    },
    index=_SCEN,
)


#: Tables 3 and 4 by method.
VERIFICATION_TABLES = {"ubw-p": TABLE3_UBWP, "ubw-c": TABLE4_UBWC}


def paper_verification(method: str) -> dict[str, pd.DataFrame]:
    """Table 3 (``ubw-p``) or 4 (``ubw-c``) as ``{"paper (CIFAR-10)": ..., "paper (ImageNet)": ...}``, each with
    the columns ``Delta P`` and ``p-value`` by scenario."""
    if method not in VERIFICATION_TABLES:
        raise ValueError(f"the paper reports verification for {sorted(VERIFICATION_TABLES)}, not {method!r}")
    t = VERIFICATION_TABLES[method]
    return {f"paper ({d})": t[d] for d in ("CIFAR-10", "ImageNet")}


def paper_table(dataset: str = "cifar10") -> pd.DataFrame:
    """Table 1 (``cifar10``) or Table 2 (``imagenet``) of the paper."""
    if dataset in ("cifar10", "CIFAR-10"):
        return TABLE1_CIFAR10.copy()
    if dataset in ("imagenet", "ImageNet"):
        return TABLE2_IMAGENET.copy()
    raise ValueError(f"the paper reports Table 1 for 'cifar10' and Table 2 for 'imagenet', not {dataset!r}")
