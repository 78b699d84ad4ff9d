"""``llmslim tune``: compress to a quality or size budget, verified on held-out text.

``run`` measures (or reads cached) per-layer sensitivities, plans per-layer grids for the budget
(``pipeline.tune``), runs GPTQ with them, measures the result on held-out text the search never
saw, and steps up when the budget is missed; ``report`` writes the table and the plot;
``commands`` is the subcommand.
"""
