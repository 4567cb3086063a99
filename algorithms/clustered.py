"""Clustered personalization (Yeganeh et al. 2022, arXiv 2207.03448): FedAvg warm-up, adaptive
hierarchical clustering of the clients' updates, one semi-global model per cluster trained with a
meta-learning objective (Reptile by default) inside the cluster."""

from typing import ClassVar, Literal

from pydantic import Field

from algorithms.meta import PerFedAvgParams, ReptileParams


class ClusteredConfig(ReptileParams, PerFedAvgParams):
    name: Literal["clustered"] = "clustered"
    server_factory: ClassVar[str] = "server.clustered:make_clustered"
    client_trainer: ClassVar[str] = "clients.clustered:train_clustered"
    packable: ClassVar[bool] = True
    warmup_rounds: int = Field(
        5, ge=1, description="FedAvg rounds before clustering (updates of the last one cluster)"
    )
    signature: Literal["all", "head"] = Field(
        "all", description="which layers' update Δ_i = w_i − w_global is compared (cosine)"
    )
    k_max: int = Field(8, ge=2, le=1000, description="largest number of clusters tried")
    s_min: float = Field(
        0.1, ge=-1.0, le=1.0, description="a cut whose silhouette is below this keeps one cluster"
    )
    distance_threshold: float | None = Field(
        None, gt=0.0, le=2.0, description="cut the dendrogram at this cosine distance instead"
    )
    recluster_every: int = Field(
        0, ge=0, description="re-cluster every R rounds after the first clustering (0 = never)"
    )
    meta: Literal["reptile", "perfedavg", "none"] = Field(
        "reptile", description="local objective inside clusters ('none' = plain local SGD)"
    )
