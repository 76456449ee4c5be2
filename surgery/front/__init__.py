"""The front end: the recipe language and what it means for a model, before any weight is read.

Recipe text is parsed (`parser`, with `syntax_errors` for the messages and the grammar assembled
from the statement modules), built into a typed syntax tree (`syntax`, `recipe`, `selectors`,
`budgets`), checked against a model index (`check`, `check_selectors`, `check_texts`, giving a
`checked.CheckedRecipe`) and planned (`planner`) into a `plan.Plan` of typed, executable steps
(`plan_step`). Each statement's syntax, check, plan and step kinds live together in
`statements/`. Nothing here imports torch, transformers or onnx at module level: `surgery check`
runs on this package and the model index alone.
"""
