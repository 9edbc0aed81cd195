"""scikit-learn ``partial_fit`` learners in the same durable store as the torch models.

* :mod:`engram.sklearn.estimators` — the supported estimators (``model=sgd_classifier``,
  ``perceptron``, ``gaussian_nb``, ``multinomial_nb``, ``bernoulli_nb``,
  ``mlp_classifier``, ``sgd_pipeline``) and their ``partial_fit``;
* :mod:`engram.sklearn.learner` — the continual loop ``engram-train`` runs for them
  (naive or replay), one version per experience;
* :mod:`engram.sklearn.persist` — skops files through engram's own allowlist, with the
  scikit-learn version checked; never pickle.

``engram.load_model(store, version)`` returns the estimator of a scikit-learn version;
docs/sklearn.md walks through it all.
"""
