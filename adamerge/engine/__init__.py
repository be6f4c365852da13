"""The merge engine: MergedModel (one merge and one forward per step) and the task-vector stores."""
