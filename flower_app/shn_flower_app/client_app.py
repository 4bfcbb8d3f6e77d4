"""ClientApp: ``flwr run`` loads ``app`` (see pyproject.toml).

A deployed SuperNode starts a fresh process for every message, so the installed ``shn`` library
(and torch) is imported only by the handlers that train or evaluate; the one-off ``query``
(which client is this node?) is answered from the node config alone, exactly as
``shn.flower.engine.handle_query`` answers it (tests/test_flower.py checks that they agree).
"""

from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg, context):
    try:
        client = int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("this SuperNode has no integer partition-id: start it with "
                         "--node-config 'partition-id=<client index>'") from None
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": client})}), reply_to=msg)


@app.train()
def train(msg, context):
    from shn.flower.engine import handle_train

    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg, context):
    from shn.flower.engine import handle_evaluate

    return handle_evaluate(msg, context)
