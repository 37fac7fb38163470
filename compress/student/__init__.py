"""Student stage: the two ways compress derives a student from the teacher, side by side.

    compress run student.layers=16        # subset.py: keep 16 of the teacher's layers, with weights
    compress run prune.params=0.5         # prune.py: structured pruning (depth, MLP, heads, hidden)
    compress run student=path/to/hf_model # subset.py: a given HF model sharing the teacher's tokenizer

Setting any `prune.*` target chooses structured pruning (the `prune` stage); otherwise the layer
subset (the `student` stage). Either writes a plain HF artifact the distill stage heals.
"""
