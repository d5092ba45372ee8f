"""Layer catalogue: each family in its own file, forward and backward side by side.

Every constructor returns a :class:`funnn.core.Layer` with ``init``, ``apply``
(the autodiff path) and the hand-written ``forward``/``backward`` pair.
"""

from funnn.layers.attention import cross_attention, multi_head_attention
from funnn.layers.combinators import out_shape, parallel, residual, serial
from funnn.layers.conv import conv1d, conv2d
from funnn.layers.dense import INITIALIZERS, dense
from funnn.layers.dropout import dropout
from funnn.layers.elementwise import activation, flatten, prelu
from funnn.layers.embedding import embedding
from funnn.layers.encoder_decoder import transformer_decoder_layer, transformer_encoder_layer
from funnn.layers.norm import batch_norm, layer_norm, rms_norm
from funnn.layers.pool import avg_pool, global_avg_pool, max_pool
from funnn.layers.recurrent import bidirectional, gru, lstm, rnn
from funnn.layers.transformer import positional_embedding, tied_embedding, transformer_block

__all__ = [
    "serial", "parallel", "residual", "out_shape",
    "dense", "INITIALIZERS", "activation", "prelu", "flatten",
    "conv1d", "conv2d", "max_pool", "avg_pool", "global_avg_pool",
    "dropout", "layer_norm", "rms_norm", "batch_norm", "embedding", "rnn", "lstm", "gru",
    "multi_head_attention", "cross_attention", "transformer_block", "positional_embedding",
    "tied_embedding", "transformer_encoder_layer", "transformer_decoder_layer", "bidirectional",
]
