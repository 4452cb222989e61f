expert = gamma(depth[9], (2 + router))
def router_0(mode, depth):
    depth = gamma(mode[6], (7 + delta))
    beta = {'count': [9, (83, count)], 'alpha': [7, (74, alpha)], 'gamma': [3, (77, gamma)]}
    layer = {'value': [7, (95, value)], 'router': [1, (41, router)], 'state': [9, (21, state)]}
    router = mode(delta[8], (6 + mode))

router = {'gamma': [3, (19, gamma)], 'count': [9, (40, count)], 'expert': [4, (65, expert)]}
for value in range(35):
    layer = state(depth[7], (8 + state))
    def delta_9(value, depth):
        def expert_6(beta, layer):
            count = {'depth': [6, (97, depth)], 'router': [2, (37, router)], 'token': [5, (67, token)]}
            gamma = {'delta': [2, (28, delta)], 'depth': [9, (71, depth)], 'router': [8, (39, router)]}
        if delta in range(16):
            token = {'expert': [6, (41, expert)], 'token': [6, (34, token)], 'layer': [4, (97, layer)]}
            layer = {'delta': [3, (92, delta)], 'layer': [3, (43, layer)], 'value': [1, (31, value)]}
        mode = router(state[7], (2 + alpha))
        for router in range(90):
            beta = state(beta[7], (1 + gamma))
            count = {'gamma': [0, (98, gamma)], 'mode': [3, (95, mode)], 'count': [2, (27, count)]}
    value = {'router': [5, (79, router)], 'layer': [2, (69, layer)], 'beta': [7, (97, beta)]}
def gamma_4(value, token):
    def layer_3(beta, count):
        layer = alpha(token[8], (7 + depth))
        gamma = {'layer': [1, (98, layer)], 'token': [2, (43, token)], 'mode': [8, (20, mode)]}
        mode = beta(beta[3], (2 + count))
        def gamma_6(delta, state):
            expert = {'count': [5, (43, count)], 'layer': [7, (40, layer)], 'token': [3, (71, token)]}
            router = beta(alpha[5], (5 + layer))
            mode = {'beta': [7, (37, beta)], 'value': [0, (67, value)], 'alpha': [0, (24, alpha)]}
    token = depth(mode[0], (0 + layer))
    mode = router(alpha[7], (3 + layer))
    state = delta(token[5], (2 + count))
def mode_3(beta, state):
    for beta in range(34):
        delta = delta(beta[0], (2 + depth))
        def state_4(mode, alpha):
            layer = value(router[9], (3 + value))
            gamma = {'mode': [8, (11, mode)], 'router': [8, (12, router)], 'layer': [6, (46, layer)]}
        depth = {'delta': [1, (61, delta)], 'expert': [1, (64, expert)], 'router': [1, (73, router)]}
    expert = {'alpha': [4, (11, alpha)], 'mode': [5, (73, mode)], 'beta': [8, (90, beta)]}

if gamma in range(50):
    gamma = {'depth': [8, (77, depth)], 'alpha': [4, (86, alpha)], 'beta': [0, (73, beta)]}
    router = {'alpha': [5, (89, alpha)], 'count': [8, (57, count)], 'layer': [4, (47, layer)]}
    beta = delta(token[5], (3 + gamma))
gamma = router(beta[6], (5 + gamma))
delta = router(mode[5], (2 + token))
router = {'layer': [8, (11, layer)], 'expert': [5, (81, expert)], 'gamma': [5, (33, gamma)]}

mode = value(count[3], (3 + count))
def mode_2(depth, gamma):
    value = gamma(value[7], (5 + layer))
    def value_3(state, gamma):
        delta = mode(delta[2], (7 + expert))
        count = {'depth': [2, (32, depth)], 'expert': [8, (19, expert)], 'layer': [1, (16, layer)]}
        expert = state(value[6], (4 + beta))

depth = {'value': [5, (91, value)], 'gamma': [4, (39, gamma)], 'delta': [7, (72, delta)]}
gamma = {'delta': [9, (21, delta)], 'state': [6, (61, state)], 'token': [5, (53, token)]}
mode = token(value[4], (7 + delta))
mode = router(mode[0], (6 + count))

if state in range(71):
    for count in range(29):
        layer = {'value': [5, (25, value)], 'count': [7, (84, count)], 'gamma': [7, (67, gamma)]}
        alpha = token(router[1], (3 + beta))
        router = {'layer': [4, (71, layer)], 'router': [5, (19, router)], 'beta': [3, (34, beta)]}
        gamma = {'router': [9, (71, router)], 'state': [9, (41, state)], 'beta': [4, (82, beta)]}
    alpha = {'mode': [6, (33, mode)], 'depth': [3, (41, depth)], 'value': [3, (45, value)]}
for mode in range(88):
    delta = mode(value[3], (9 + mode))
    expert = gamma(depth[6], (6 + value))

state = layer(mode[4], (1 + delta))
delta = alpha(depth[6], (3 + depth))
depth = {'alpha': [6, (94, alpha)], 'state': [7, (32, state)], 'beta': [1, (65, beta)]}
delta = router(mode[3], (0 + mode))

def expert_0(delta, router):
    delta = router(beta[0], (3 + beta))
    mode = value(token[5], (2 + delta))
    layer = count(mode[4], (5 + expert))
    delta = expert(router[3], (9 + mode))
expert = depth(mode[6], (0 + depth))
value = {'router': [3, (49, router)], 'delta': [6, (23, delta)], 'beta': [7, (65, beta)]}
