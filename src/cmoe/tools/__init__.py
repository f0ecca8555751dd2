"""What is built on the library: the `cmoe` command, perplexity and zero-shot evaluation, sweeps and their
reports and plots, the recovery fine-tune, and the speed benchmark harness."""
