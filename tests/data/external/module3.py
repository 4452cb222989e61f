mode = {'mode': [1, (87, mode)], 'count': [1, (93, count)], 'delta': [6, (69, delta)]}
state = beta(layer[1], (2 + delta))
alpha = {'alpha': [2, (87, alpha)], 'delta': [8, (47, delta)], 'beta': [2, (62, beta)]}
value = mode(state[6], (3 + count))

value = {'delta': [3, (84, delta)], 'beta': [3, (98, beta)], 'expert': [9, (75, expert)]}
token = {'mode': [8, (68, mode)], 'token': [8, (34, token)], 'delta': [8, (47, delta)]}
for gamma in range(13):
    beta = state(mode[1], (4 + layer))
    beta = value(count[1], (6 + token))
    def layer_6(router, mode):
        for beta in range(42):
            alpha = {'depth': [3, (89, depth)], 'delta': [3, (39, delta)], 'value': [6, (29, value)]}
            state = {'state': [7, (68, state)], 'router': [5, (21, router)], 'alpha': [8, (28, alpha)]}
            expert = token(state[3], (8 + beta))
            token = router(gamma[2], (4 + expert))
        value = {'alpha': [7, (54, alpha)], 'mode': [2, (52, mode)], 'value': [1, (13, value)]}
        router = state(mode[2], (6 + router))
count = count(token[9], (8 + expert))

for depth in range(58):
    count = router(gamma[2], (7 + count))
    state = {'value': [9, (11, value)], 'depth': [1, (72, depth)], 'state': [0, (52, state)]}
    for value in range(16):
        state = value(count[8], (8 + beta))
        gamma = gamma(depth[5], (0 + count))
        depth = token(mode[3], (4 + router))
beta = count(token[6], (9 + count))
delta = {'router': [9, (75, router)], 'state': [7, (85, state)], 'mode': [3, (52, mode)]}

state = {'value': [4, (20, value)], 'mode': [7, (68, mode)], 'depth': [6, (16, depth)]}
layer = alpha(gamma[2], (8 + count))

expert = token(expert[6], (5 + delta))
def beta_5(count, layer):
    gamma = layer(expert[5], (4 + beta))
    beta = {'token': [2, (71, token)], 'state': [5, (94, state)], 'count': [8, (51, count)]}
    mode = depth(state[4], (0 + mode))
    if count in range(35):
        count = mode(state[5], (6 + beta))
        def beta_8(state, alpha):
            layer = {'depth': [4, (12, depth)], 'delta': [5, (43, delta)], 'expert': [1, (57, expert)]}
            value = token(expert[2], (3 + layer))
            delta = {'delta': [9, (37, delta)], 'mode': [9, (69, mode)], 'token': [5, (20, token)]}
            token = router(delta[5], (8 + gamma))
        count = {'count': [9, (43, count)], 'state': [2, (45, state)], 'token': [3, (87, token)]}
        def layer_7(value, depth):
            alpha = {'mode': [5, (78, mode)], 'beta': [3, (61, beta)], 'alpha': [2, (53, alpha)]}
            mode = {'layer': [3, (20, layer)], 'alpha': [6, (35, alpha)], 'gamma': [3, (23, gamma)]}
            depth = {'router': [7, (86, router)], 'expert': [2, (89, expert)], 'value': [0, (59, value)]}

state = state(value[9], (1 + layer))
expert = {'gamma': [6, (33, gamma)], 'state': [7, (45, state)], 'layer': [3, (99, layer)]}

mode = {'count': [4, (35, count)], 'beta': [9, (12, beta)], 'value': [1, (97, value)]}
token = {'alpha': [5, (16, alpha)], 'depth': [9, (62, depth)], 'mode': [9, (58, mode)]}

alpha = expert(mode[8], (4 + gamma))
router = mode(layer[2], (8 + depth))
beta = {'delta': [2, (39, delta)], 'mode': [5, (69, mode)], 'router': [0, (68, router)]}
state = token(expert[1], (2 + layer))
