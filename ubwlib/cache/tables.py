"""Tables as JSON data: :func:`table_to_data` encodes a pandas DataFrame (column order, labels, index and
dtypes kept; floats bit-exact) for an entry's ``data``, :func:`table_from_data` rebuilds it. pandas is
imported on first use (importing it costs ~0.3 s)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .keys import type_name
from .payload import json_default

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["table_from_data", "table_to_data"]


def _scalar_to_json(x: Any) -> Any:
    import pandas as pd

    if x is None or (not isinstance(x, (list, tuple, dict)) and pd.isna(x) is True):
        return None
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (str, bool, int, float)):
        return x
    if isinstance(x, (list, tuple, dict)):
        return json.loads(json.dumps(x, allow_nan=True, default=json_default))
    raise TypeError(f"table_to_data: cannot store a cell of type {type_name(x)}")


def _encode_series(values: Any) -> dict[str, Any]:
    """Encode a Series or Index (one column / index level) as JSON data, dtype included."""
    import pandas as pd

    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        cat = pd.Categorical(values)
        return {
            "dtype": "category",
            "ordered": bool(cat.ordered),
            "categories": _encode_series(cat.categories),
            "codes": [int(c) for c in cat.codes],
        }
    if isinstance(dtype, pd.DatetimeTZDtype):
        utc = pd.DatetimeIndex(values).tz_convert("UTC")
        return {"dtype": str(dtype), "tz": str(dtype.tz),
                "values": [None if pd.isna(v) else v.isoformat() for v in utc]}
    kind = getattr(dtype, "kind", "O")
    if kind == "M":
        return {"dtype": str(dtype), "values": [None if pd.isna(v) else v.isoformat() for v in pd.DatetimeIndex(values)]}
    if kind == "m":
        return {"dtype": str(dtype), "values": [None if pd.isna(v) else int(v.value) for v in pd.TimedeltaIndex(values)]}
    if isinstance(dtype, np.dtype) and kind in "biuf":
        # Python scalars: floats are written with repr(), i.e. bit-exact; NaN -> JSON NaN.
        return {"dtype": str(dtype), "values": list(np.asarray(values).tolist())}
    if kind == "c" or isinstance(dtype, (pd.PeriodDtype, pd.IntervalDtype, pd.SparseDtype)):
        raise TypeError(f"table_to_data: unsupported dtype {dtype}")
    return {"dtype": str(dtype), "values": [_scalar_to_json(v) for v in values]}


def _decode_series(enc: Mapping[str, Any]) -> Any:
    import pandas as pd

    dtype = enc["dtype"]
    if dtype == "category":
        cats = pd.Index(_decode_series(enc["categories"]))
        return pd.Series(pd.Categorical.from_codes(enc["codes"], categories=cats, ordered=enc["ordered"]))
    target = pd.api.types.pandas_dtype(dtype)
    vals = enc["values"]
    if isinstance(target, pd.DatetimeTZDtype):
        s = pd.Series(pd.to_datetime(pd.Series(vals, dtype=object), utc=True, format="ISO8601"))
        return s.dt.tz_convert(enc["tz"]).astype(target)
    kind = getattr(target, "kind", "O")
    if kind == "M":
        return pd.Series(pd.to_datetime(pd.Series(vals, dtype=object), format="ISO8601")).astype(target)
    if kind == "m":
        ns = [pd.NaT if v is None else pd.Timedelta(int(v), unit="ns") for v in vals]
        return pd.Series(ns, dtype="timedelta64[ns]").astype(target)
    if kind in "biuf" and isinstance(target, np.dtype):
        return pd.Series(np.asarray(vals, dtype=target))
    return pd.Series(vals, dtype=target)


def _encode_index(index: pd.Index) -> dict[str, Any]:
    import pandas as pd

    if isinstance(index, pd.RangeIndex):
        return {"kind": "range", "start": int(index.start), "stop": int(index.stop),
                "step": int(index.step), "name": _scalar_to_json(index.name)}
    if isinstance(index, pd.MultiIndex):
        return {"kind": "multi", "names": [_scalar_to_json(n) for n in index.names],
                "levels": [_encode_series(index.get_level_values(i)) for i in range(index.nlevels)]}
    return {"kind": "index", "name": _scalar_to_json(index.name), "values": _encode_series(index)}


def _decode_index(enc: Mapping[str, Any]) -> pd.Index:
    import pandas as pd

    kind = enc["kind"]
    if kind == "range":
        return pd.RangeIndex(enc["start"], enc["stop"], enc["step"], name=enc["name"])
    if kind == "multi":
        arrays = [pd.Index(_decode_series(level)) for level in enc["levels"]]
        return pd.MultiIndex.from_arrays(arrays, names=enc["names"])
    return pd.Index(_decode_series(enc["values"]), name=enc["name"])


def table_to_data(df: pd.DataFrame) -> dict[str, Any]:
    """Encode a DataFrame as JSON data for an entry's ``data`` (column-wise records).

    Column order, column labels, the index (incl. RangeIndex/MultiIndex and names) and the
    dtypes are preserved: numpy numeric/bool (floats bit-exact), str/object/string,
    nullable (``Int64``, ``boolean``, ...), category, datetime (naive or tz-aware) and
    timedelta. Other dtypes or non-JSON cells raise TypeError. Inverse: :func:`table_from_data`.
    """
    return {
        "__ubw_table__": 1,
        "nrows": int(len(df)),
        "columns": _encode_index(df.columns),
        "index": _encode_index(df.index),
        "data": [_encode_series(df.iloc[:, i]) for i in range(df.shape[1])],
    }


def table_from_data(d: Mapping[str, Any]) -> pd.DataFrame:
    """Rebuild the DataFrame encoded by :func:`table_to_data`."""
    import pandas as pd

    if not isinstance(d, Mapping) or d.get("__ubw_table__") != 1:
        raise ValueError("table_from_data: not a table encoded by ubwlib.cache.table_to_data")
    cols = [_decode_series(c) for c in d["data"]]
    df = pd.DataFrame(dict(enumerate(cols)), index=pd.RangeIndex(d["nrows"]))
    df.columns = _decode_index(d["columns"])
    df.index = _decode_index(d["index"])
    return df

