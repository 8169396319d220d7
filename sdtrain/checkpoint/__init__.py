"""sdtrain's checkpoint format, in one package: what a checkpoint holds (format.py), the model spec that rebuilds
it (spec.py), single files (files.py) and sharded directories (sharded.py), picking the one to resume from
(resume.py), weights from any file for fine-tuning (weights.py), and a trained model back from it (trained.py).

Sampling, export and evaluation import from here, never from training/.
"""
