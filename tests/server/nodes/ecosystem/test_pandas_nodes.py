"""DataFrameAggregate through a real server in each runtime, against pandas called directly;
bit-exact across runtimes (pandas' group-by kernels are single-threaded and deterministic)."""

from __future__ import annotations

import numpy as np
import pytest

from tensorline.client import AsyncClient, InvalidRequestError, Json, NodeError
from tests.server.nodes.ecosystem.conftest import (
    RUNTIMES,
    assert_bit_exact,
    run_both,
    run_node,
)
from tests.support.manifests import one_node

pd = pytest.importorskip("pandas", reason="pandas is not installed (pip install pandas)")

COLUMNS = ["store", "item", "qty", "price"]
PARAMS = {"group_by": ["store"], "agg": {"qty": ["sum", "mean", "count"], "price": "max"}}


def table(rows: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.column_stack([
        rng.integers(0, 7, rows), rng.integers(0, 50, rows),
        rng.integers(1, 10, rows), rng.uniform(0.5, 20, rows),
    ]).astype(np.float64)


def expected_from_pandas(data: np.ndarray) -> np.ndarray:
    grouped = pd.DataFrame(data, columns=COLUMNS).groupby(["store"]).agg(
        {"qty": ["sum", "mean", "count"], "price": ["max"]})
    return np.column_stack([grouped.index.to_numpy(dtype=np.float64),
                            grouped.to_numpy(dtype=np.float64)])


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_aggregate_with_column_names_from_the_port(eco_client: AsyncClient,
                                                         runtime: str) -> None:
    data = table()
    result = await run_node(eco_client, runtime, "DataFrameAggregate", PARAMS,
                            {"in": data, "columns": Json(COLUMNS)})
    assert result["n:columns"].value == ["store", "qty_sum", "qty_mean", "qty_count", "price_max"]
    assert_bit_exact(result["n:out"], expected_from_pandas(data))


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_aggregate_whole_table_with_column_names_as_params(eco_client: AsyncClient,
                                                                 runtime: str) -> None:
    data = table(257).astype(np.float32)
    params = {"columns": COLUMNS, "agg": {"price": ["mean", "std"], "item": "nunique"}}
    result = await run_node(eco_client, runtime, "DataFrameAggregate", params, {"in": data})
    frame = pd.DataFrame(data, columns=COLUMNS)
    expected = np.array([[frame["price"].mean(), frame["price"].std(), frame["item"].nunique()]],
                        dtype=np.float64)
    assert result["n:columns"].value == ["price_mean", "price_std", "item_nunique"]
    np.testing.assert_allclose(result["n:out"], expected, rtol=1e-6)


async def test_aggregate_bit_exact_across_runtimes(eco_client: AsyncClient) -> None:
    data = table(20_000)
    data[::97, 0] = np.nan  # NaN keys are dropped (dropna) identically in both runtimes
    inprocess, sandboxed = await run_both(eco_client, "DataFrameAggregate", PARAMS,
                                          {"in": data, "columns": Json(COLUMNS)})
    assert inprocess["n:columns"].value == sandboxed["n:columns"].value
    assert_bit_exact(inprocess["n:out"], sandboxed["n:out"])


async def test_aggregate_errors_name_the_problem(eco_client: AsyncClient) -> None:
    with pytest.raises(NodeError, match="unknown column"):
        await eco_client.execute(
            one_node("DataFrameAggregate", {"group_by": ["shop"], "agg": {"qty": "sum"}},
                     "inprocess"),
            {"n:in": table(5), "n:columns": Json(COLUMNS)})
    with pytest.raises(NodeError, match="3 column name"):
        await eco_client.execute(
            one_node("DataFrameAggregate", {"columns": COLUMNS[:3], "agg": {"qty": "sum"}},
                     "inprocess"), {"n:in": table(5)})
    with pytest.raises(InvalidRequestError, match="agg"):
        await eco_client.execute(
            one_node("DataFrameAggregate", {"columns": COLUMNS, "agg": {"qty": "explode"}},
                     "inprocess"), {"n:in": table(5)})
