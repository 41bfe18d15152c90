"""Progressive rollouts: a candidate version takes a growing share of an alias's traffic, judged by
the replicas' health reports, moved on, held or rolled back by whichever worker stores each move."""
