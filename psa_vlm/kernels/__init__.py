"""PSA stages, one folder per op: ``naive.py`` (plain-PyTorch reference) beside ``kernel.py`` (Triton).

Both files of an op export one function with the same signature and docstring contract:

- ``pool``: ``pyramid_pool(k, v, *, block_k, factors, sim_thresholds)`` -> ``(k_pooled, v_pooled, cap)``
- ``estimate``: ``block_importance(q, k, *, block_q, block_k, stride, scale)`` -> scores
- ``assign``: ``assign_levels(scores, cap, kv_flags, q_flags, *, lq, lk, config)`` -> ``(factors, kv_idx, counts)``
- ``attention``: ``sparse_attention(q, k, v, k_pooled, v_pooled, kv_idx, counts, *, block_q, block_k,
  factors, scale, key_padding_mask, out)`` -> output

Importing this package imports neither Triton nor any kernel module.
"""
