"""pandas node: a tensor plus column names -> a DataFrame group-by aggregation -> a tensor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from tensorline.server.nodes._node import Node, NodeParams, NodeTraits, Port
from tensorline.wire import Json

TENSORLINE_REQUIRES = ("pandas",)

AggFunc = Literal["sum", "mean", "median", "min", "max", "count", "std", "var", "first", "last",
                  "nunique", "prod"]


class DataFrameAggregateParams(NodeParams):
    columns: list[str] | None = Field(
        None, description="names of the input tensor's columns (or send them to the 'columns' port)")
    group_by: list[str] = Field(default_factory=list,
                                description="key columns; empty = aggregate the whole table")
    agg: dict[str, AggFunc | list[AggFunc]] = Field(
        min_length=1, description="column -> aggregation function(s)")
    sort: bool = Field(True, description="sort groups by key")
    dropna: bool = Field(True, description="drop groups whose key is NaN")

    @field_validator("columns")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("column names must be unique")
        return value

    @model_validator(mode="after")
    def _keys_not_aggregated(self) -> DataFrameAggregateParams:
        both = set(self.group_by) & set(self.agg)
        if both:
            raise ValueError(f"columns {sorted(both)} are group keys and cannot be aggregated")
        return self


class DataFrameAggregate(Node):
    """Group a 2-D tensor's rows by key columns and aggregate the others with pandas.

    The tensor's columns are named by the ``columns`` param or a JSON list sent to the
    ``columns`` input port. Output ``out``: a float64 tensor, one row per group (key columns
    first, then one column per aggregation); output ``columns``: the JSON list of those column
    names (``<column>_<func>`` for aggregations).
    """

    Params = DataFrameAggregateParams
    params: DataFrameAggregateParams
    inputs = (
        Port("in", kind="tensor", description="2-D table, rows x columns"),
        Port("columns", kind="json", required=False, description="list of column names"),
    )
    outputs = (
        Port("out", kind="tensor", description="float64, groups x (keys + aggregations)"),
        Port("columns", kind="json", description="names of the output columns"),
    )
    traits = NodeTraits(libraries=("pandas",))

    def process(self, inputs: Mapping[str, Any]) -> Any:
        import pandas as pd

        table = inputs["in"]
        if table.ndim != 2:
            raise ValueError(f"expected a 2-D tensor (rows x columns), got shape {table.shape}")
        names = self._column_names(inputs.get("columns"), table.shape[1])
        missing = sorted((set(self.params.group_by) | set(self.params.agg)) - set(names))
        if missing:
            raise ValueError(f"unknown column(s) {missing}; the table has {names}")
        # copy=False: the input is a read-only view and pandas only reads it here.
        frame = pd.DataFrame(table, columns=names, copy=False)
        spec = {col: (funcs if isinstance(funcs, list) else [funcs])
                for col, funcs in self.params.agg.items()}
        if self.params.group_by:
            grouped = frame.groupby(self.params.group_by, sort=self.params.sort,
                                    dropna=self.params.dropna).agg(spec)
            keys = grouped.index.to_frame(index=False).to_numpy(dtype=np.float64)
        else:
            # One constant key: the same aggregation code path (and column layout) for the
            # whole table as for groups.
            grouped = frame.groupby(np.zeros(len(frame), dtype=np.int8)).agg(spec)
            keys = np.empty((len(grouped), 0), dtype=np.float64)
        out_names = list(self.params.group_by) + [f"{col}_{func}" for col, func in grouped.columns]
        values = grouped.to_numpy(dtype=np.float64)
        out = np.ascontiguousarray(np.concatenate([keys, values], axis=1))
        return {"out": out, "columns": Json(out_names)}

    def _column_names(self, sent: Any, width: int) -> list[str]:
        if sent is not None:
            names = sent.value if isinstance(sent, Json) else sent
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("the 'columns' input must be a JSON list of strings")
            if len(set(names)) != len(names):
                raise ValueError("column names must be unique")
        elif self.params.columns is not None:
            names = self.params.columns
        else:
            raise ValueError("column names are needed: set the 'columns' param or send them to "
                             "the 'columns' port")
        if len(names) != width:
            raise ValueError(f"{len(names)} column name(s) for a tensor with {width} column(s)")
        return list(names)


TENSORLINE_NODES = (DataFrameAggregate,)
