"""Reading finished audits and turning them into things people look at: the HTML report,
the comparison figure, and the diff of two audits. Nothing here runs a model."""
