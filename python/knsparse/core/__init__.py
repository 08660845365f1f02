"""Foundation: what every stage shares.

``pattern`` (k:n patterns and how conv weights are grouped), ``masks`` (k:n / unstructured mask
rules, reduction views), ``compress`` (kept values + slots for any k:n), ``pack`` (CUTLASS 2:4
values + metadata), ``layers`` (which modules a k:n GEMM can execute), ``plan`` (the frozen
contract between the stages) and ``checks`` (argument checks that name the argument).
Nothing here imports a stage.
"""
