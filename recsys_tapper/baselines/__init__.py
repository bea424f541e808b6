"""Baselines for the comparison table: classical rating predictors, RAG prompts, OPPU per-user LoRAs.

- :mod:`recsys_tapper.baselines.classical`: ``global_mean``, ``user_mean``, ``item_mean``, ``user_item_bias``,
  ``biased_mf`` fitted on the visible ratings (numpy only, no LM).
- :mod:`recsys_tapper.baselines.rag`: ``rag_recency_k4`` / ``rag_bm25_k4``, the question with k profile records
  in front, scored by the Stage-1 model.
- :mod:`recsys_tapper.baselines.oppu`: one LoRA (r=8 on q_proj, v_proj) per user on the Stage-1 model.

Submodules are imported on use (``oppu`` pulls in peft/transformers; ``classical`` needs only numpy).
"""
