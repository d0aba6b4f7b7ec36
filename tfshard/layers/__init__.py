"""tfshard's tensor-parallel Keras layers."""

from tfshard.layers.base import ShardedLayerMixin
from tfshard.layers.dense import ColumnParallelDense, RowParallelDense
from tfshard.layers.attention import (
    HeadParallelAttention,
    HeadParallelGroupedQueryAttention,
)
from tfshard.layers.embedding import VocabParallelEmbedding
from tfshard.layers.normalization import (
    ShardedLayerNormalization,
    ShardedRMSNormalization,
)

__all__ = [
    "ShardedLayerMixin",
    "ColumnParallelDense",
    "RowParallelDense",
    "HeadParallelAttention",
    "HeadParallelGroupedQueryAttention",
    "VocabParallelEmbedding",
    "ShardedLayerNormalization",
    "ShardedRMSNormalization",
]

# Convolutions on channel-split and spatially split images (issue 5).
from tfshard.layers.conv import (  # noqa: E402
    ChannelParallelConv1D,
    ChannelParallelConv2D,
    ChannelParallelDepthwiseConv2D,
)
from tfshard.layers.spatial import (  # noqa: E402
    SpatialParallelAveragePooling2D,
    SpatialParallelConv2D,
    SpatialParallelMaxPooling2D,
    describe_tiling,
)

__all__ += [
    "ChannelParallelConv1D",
    "ChannelParallelConv2D",
    "ChannelParallelDepthwiseConv2D",
    "SpatialParallelConv2D",
    "SpatialParallelMaxPooling2D",
    "SpatialParallelAveragePooling2D",
    "describe_tiling",
]

# GShard-style mixture of experts, experts split over a mesh axis (issue 11).
from tfshard.layers.moe import ExpertParallelMoE, reference_moe  # noqa: E402

__all__ += ["ExpertParallelMoE", "reference_moe"]
