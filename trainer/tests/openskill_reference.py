"""Rates matches with the `openskill` Python package: the reference the operator's
Plackett-Luce implementation is checked against.

    python openskill_reference.py MATCHES.json

MATCHES.json: [{"model": {mu, sigma, beta, tau, kappa}, "players": [{mu, sigma, score}]}].
Prints, per match, each player's [mu, sigma] after the match.
"""

import json
import sys

import openskill
from openskill.models import PlackettLuce

assert openskill.__version__ == "6.2.0", openskill.__version__

out = []
for match in json.load(open(sys.argv[1])):
    m = match["model"]
    model = PlackettLuce(mu=m["mu"], sigma=m["sigma"], beta=m["beta"], tau=m["tau"], kappa=m["kappa"])
    teams = [[model.rating(mu=p["mu"], sigma=p["sigma"])] for p in match["players"]]
    rated = model.rate(teams, scores=[p["score"] for p in match["players"]])
    out.append([[team[0].mu, team[0].sigma] for team in rated])
print(json.dumps(out))
