"""Route modules, one per noun: datasets, jobs, distill, models, health."""
